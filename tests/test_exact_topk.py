"""Top-k error is exact on adversarial predictions: uniform rows, a constant-class member,
overconfident 1,000-class members (written from float32 logits by the platform's own
prediction writer and read back) and their saturated averages, against a float64
reference computed here, independently of ensemble.core.math."""
import json
import warnings

import numpy as np
import torch
import yaml

from ensemble import evaluate
from orchestrator.train import loop
from orchestrator.train.member import assemble_predictions

EVAL = {"input_size": 32, "resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


def reference_misses(p, y, k) -> int:
    """float64, a tie with the true class counted as a miss: hit iff fewer than k other
    classes have probability >= the true class's. The number of misses."""
    p = np.asarray(p, dtype=np.float64)
    true = p[np.arange(len(y)), y][:, None]
    others_at_least = (p >= true).sum(1) - 1
    return int((others_at_least >= k).sum())


def assert_exact(err: float, misses: int, n: int) -> None:
    """The reported error is that many misses out of n: the count, not an approximation."""
    assert round(err * n) == misses and abs(err - misses / n) < 1e-12, (err * n, misses)


def write_runs(folder, preds, labels):
    np.save(folder / "labels.npy", labels)
    members = []
    for i, p in enumerate(preds):
        np.save(folder / f"m{i}.npy", p)
        members.append({"name": f"m{i}", "key": f"m{i}-k", "arch": "resnet18", "predictions": str(folder / f"m{i}.npy"),
                        "eval": EVAL})
    runs = {"version": 1, "ensemble": "adv", "members": members,
            "dataset": {"name": "adv", "uri": str(folder), "split": "val", "num_classes": preds[0].shape[1],
                        "samples": len(labels), "labels": str(folder / "labels.npy")}}
    (folder / "runs.yaml").write_text(yaml.safe_dump(runs))
    return folder / "runs.yaml"


def evaluate_json(tmp_path, preds, labels) -> dict:
    runs = write_runs(tmp_path, preds, labels)
    assert evaluate.main(["--members", str(runs), "--out", str(tmp_path / "rep"), "--json", str(tmp_path / "r.json"),
                          "--no-mlflow"]) == 0
    return json.loads((tmp_path / "r.json").read_text())


def stored_from_logits(logits: torch.Tensor) -> np.ndarray:
    """Through the member's own writer: the val pass's {index: softmax row}, assembled."""
    rows = logits.float().softmax(1)
    return assemble_predictions([dict(enumerate(rows))], len(rows))


def test_uniform_rows_are_top1_wrong(tmp_path):
    y = np.random.default_rng(0).integers(0, 100, 500)
    report = evaluate_json(tmp_path, [np.full((500, 100), 0.01, dtype=np.float32)], y)
    assert report["members"][0]["top1_err"] == 1.0 and report["members"][0]["top5_err"] == 1.0


def test_a_constant_class_member_hits_only_its_class(tmp_path):
    y = np.random.default_rng(1).integers(0, 100, 1000)
    const = np.zeros((1000, 100), dtype=np.float32)
    const[:, 7] = 1.0
    m = evaluate_json(tmp_path, [const], y)["members"][0]
    assert reference_misses(const, y, 1) == reference_misses(const, y, 5) == int((y != 7).sum())
    assert_exact(m["top1_err"], int((y != 7).sum()), 1000)
    assert_exact(m["top5_err"], int((y != 7).sum()), 1000)  # the 99 zeros tie: no free top-5 hits


def test_overconfident_members_and_their_saturated_mean_match_float64(tmp_path):
    rng = np.random.default_rng(2)
    n, c = 1500, 1000
    y = rng.integers(0, c, n)
    preds = []
    for _ in range(3):
        z = rng.standard_normal((n, c)) * 4.0
        target = np.where(rng.random(n) < 0.25, rng.integers(0, c, n), y)
        z[np.arange(n), target] += 60.0  # saturated: the winner's float32 softmax is exactly 1
        preds.append(stored_from_logits(torch.from_numpy(z)))
    assert preds[0].dtype == np.float32 and (preds[0] == 0).sum(1).max() < c - 5  # nothing underflowed to 0
    report = evaluate_json(tmp_path, preds, y)
    mean = np.mean(np.stack(preds).astype(np.float64), 0)
    for k in (1, 5):
        for i, p in enumerate(preds):
            assert_exact(report["members"][i][f"top{k}_err"], reference_misses(p, y, k), n)
        assert_exact(report["ensemble"][f"top{k}_err"], reference_misses(mean, y, k), n)
    # the float64 truth is far from the flattering figure float16 storage gave
    assert report["members"][0]["top5_err"] > 0.2


def test_epoch_metrics_use_the_same_rule():
    class Tied(torch.nn.Module):  # all classes tied: no hit at any k < 10 (topk would pick half)
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)

    loader = [(torch.arange(40), torch.zeros(40, 3, 4, 4), torch.arange(40) % 10)]
    metrics, _ = loop.evaluate(Tied(), loader, torch.device("cpu"), bf16=False)
    assert metrics["val_top1_err"] == metrics["val_top5_err"] == 1.0


def test_old_float16_files_load_with_a_warning(tmp_path):
    y = np.arange(50) % 10
    probs = torch.randn(50, 10).softmax(1).numpy().astype(np.float16)
    runs = write_runs(tmp_path, [probs], y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert evaluate.main(["--members", str(runs), "--out", str(tmp_path / "rep"), "--no-mlflow"]) == 0
    assert any("float16" in str(w.message) and "ties" in str(w.message) for w in caught)
