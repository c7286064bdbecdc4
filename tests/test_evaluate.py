"""orthodiff evaluate on a two-site phantom: a 3 T training site's model validated on a 1.5 T external site."""

from __future__ import annotations

import json
import os

import pytest

from orthodiff_nnunet.api import convert
from orthodiff_nnunet.data.phantom import write_site
from orthodiff_nnunet.data.sites import SITE_3T, SITE_15T
from orthodiff_nnunet.networks.build import write_shrunk_plans


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    from orthodiff_nnunet.planning import plan_and_preprocess
    from orthodiff_nnunet.segmentation import train_segmentation

    root = tmp_path_factory.mktemp("evaluate")
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res")}
    old = {k: os.environ.get(k) for k in [*env, "nnUNet_n_proc_DA", "nnUNet_compile"]}
    os.environ.update(env)
    train = write_site(root / "A", SITE_3T, n_cases=4, seed=1, orientations=("sag",))
    convert(train, 541, "EvalA", num_processes=1)
    external = write_site(root / "B", SITE_15T, n_cases=3, seed=2, orientations=("sag",))
    convert(external, 551, "EvalB", external=True, num_processes=1)
    planned = plan_and_preprocess([541], num_processes=1, show_progress=False)
    write_shrunk_plans(root / "pre" / "Dataset541_EvalASag", planned.datasets[0].plans_identifier, "tinyPlans")
    os.environ.update({"nnUNet_n_proc_DA": "0", "nnUNet_compile": "0"})
    model = train_segmentation(541, fold="all", init="scratch", plans="tinyPlans", epochs=2, iterations_per_epoch=5,
                               val_iterations_per_epoch=1, device="cpu", validation_mirroring=False)
    yield root, model
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_evaluate_segmentation_on_external_site(two_sites):
    from orthodiff_nnunet.evaluation.external import EvaluationError, evaluate

    root, model = two_sites
    out = root / "report"
    result = evaluate([551], out, seg_models={"sag": model.model_folder}, n_boot=100, device="cpu", num_processes=0)
    assert result.num_seg_cases == 3 and result.report_html.is_file()
    rep = json.loads((out / "report.json").read_text())
    rows = rep["segmentation"]["cases"]
    assert len(rows) == 3 * 11  # every labeled external case x 11 structures
    assert {r["site"] for r in rows} == {"SiteB"} and {r["field_strength_t"] for r in rows} == {1.5}
    dice = [r["dice"] for r in rows if r["dice"] is not None]
    assert dice and all(0.0 <= d <= 1.0 for d in dice)
    femur = rep["segmentation"]["overall"]["femur"]["dice"]
    assert femur["n"] == 3
    assert list(rep["segmentation"]["strata"]["site"]) == ["SiteB"]
    assert rep["provenance"]["external_datasets"] == {"sag": "Dataset551_EvalBSag"}
    assert len(rep["provenance"]["input_data_sha256"]) == 64
    # every prediction lies on its source image's grid
    preds = sorted((out / "segmentation" / "sag").glob("*.nii.gz"))
    assert len(preds) == 3
    with pytest.raises(EvaluationError, match="no cor dataset|has no cor"):
        evaluate([551], root / "r2", seg_models={"cor": model.model_folder}, n_boot=10, device="cpu")
