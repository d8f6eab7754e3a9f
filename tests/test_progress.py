"""The job's live member table: rows from each member's epoch reports, a plain line per
epoch when the output is not a terminal, one line for a restart."""
import io
import os
from types import SimpleNamespace

from rich.console import Console

from orchestrator.config import parse_config, resolve_members
from orchestrator.views.progress import MemberBoard


def members():
    cfg = parse_config({"name": "p", "data": {"root": "/d"}, "recipes": {"r": {"epochs": 4}},
                        "members": [{"arch": "resnet18", "recipe": "r", "input_size": 32, "name": "a"},
                                    {"arch": "vgg11_bn", "recipe": "r", "input_size": 32, "name": "b"},
                                    {"arch": "resnet18", "recipe": "r", "input_size": 32, "name": "c", "seed": 1}]})
    return resolve_members(cfg)


def trial(member):
    return SimpleNamespace(config={"member_key": member.key}, error_msg=None)


def epoch(board, t, k, **extra):
    board.on_trial_result(0, [], t, {"epoch": k, "train_loss": 2.0 / k, "minival_top1_err": 0.5, "minival_top5_err": 0.2,
                                     "images_per_s": 93.0, "epoch_minutes": 1.5, **extra})


def test_plain_lines_one_per_member_epoch():
    out = io.StringIO()
    ms = members()
    board = MemberBoard(ms, "minival", Console(file=out, width=200), live=False, concurrency=2)
    a, b = trial(ms[0]), trial(ms[1])
    board.on_trial_start(0, [], a)
    board.on_trial_start(0, [], b)
    epoch(board, a, 1)
    epoch(board, a, 2)
    epoch(board, b, 1)
    lines = out.getvalue().strip().splitlines()
    assert lines == [
        "member a (resnet18): epoch 1/4, train loss 2.000, minival top-1 err 50.0% top-5 err 20.0%, 93 images/s, 4.5 min left",
        "member a (resnet18): epoch 2/4, train loss 1.000, minival top-1 err 50.0% top-5 err 20.0%, 93 images/s, 3.0 min left",
        "member b (vgg11_bn): epoch 1/4, train loss 2.000, minival top-1 err 50.0% top-5 err 20.0%, 93 images/s, 4.5 min left"]
    assert board.counts() == {"done": 0, "running": 2, "pending": 1, "failed": 0}
    # left: a 3.0, b 4.5, c (pending) a typical 6.0 min, over 2 slots -> 6.75 min
    assert board.footer() == "0 done, 2 running, 1 pending; job: about 6.8 min left"


def test_a_restart_is_one_line_naming_the_member_and_epoch():
    out = io.StringIO()
    ms = members()
    board = MemberBoard(ms, "val", Console(file=out, width=200), live=False)
    a = trial(ms[0])
    epoch(board, a, 2)
    a.error_msg = "Traceback (most recent call last):\n  ...\nRayActorError: The actor died unexpectedly"
    board.on_trial_recover(0, [], a)
    last = out.getvalue().strip().splitlines()[-1]
    assert last == ("member a: restarted (RayActorError: The actor died unexpectedly); resumes after epoch 2 "
                    "from its latest checkpoint")
    assert board.rows[ms[0].key].restarts == 1 and "Traceback" not in out.getvalue()


def test_live_table_on_a_terminal():
    out = io.StringIO()
    ms = members()
    board = MemberBoard(ms, "minival", Console(file=out, width=160, force_terminal=True), concurrency=1)
    a = trial(ms[0])
    board.on_trial_start(0, [], a)
    epoch(board, a, 4)
    board.on_trial_complete(0, [], a)
    board.stop()
    text = out.getvalue()
    for cell in ("minival top-1 err", "4/4", "done", "1 done, 0 running, 2 pending"):
        assert cell in text
    assert "member a (resnet18): epoch" not in text  # no plain lines on a terminal


def test_the_board_survives_tunes_pickling():
    import pickle

    board = MemberBoard(members(), "val", Console(file=io.StringIO(), force_terminal=True))
    board.on_trial_start(0, [], trial(members()[0]))
    again = pickle.loads(pickle.dumps(board))
    assert again.rows == board.rows and again.live is None
    board.stop()


def test_tunes_traceback_of_a_failed_trial_goes_to_the_log_file(tmp_path, capsys):
    """Tune logs a failed trial's whole traceback; during the job it lands in the log file
    that the restart line names, not on the terminal."""
    import logging

    from orchestrator.views.progress import TUNE_CONTROLLER_LOGGER, quiet_tune

    path = str(tmp_path / "logs" / "job.log")
    log = logging.getLogger(TUNE_CONTROLLER_LOGGER)
    try:
        raise RuntimeError("worker died")
    except RuntimeError as exc:
        error = exc
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    with quiet_tune(path):
        log.error("Trial task failed for trial member_trial_00000", exc_info=error)
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # no start banner from Tune's new output engine
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == before
    written = open(path).read()
    assert "Trial task failed" in written and "Traceback (most recent call last)" in written
    assert "RuntimeError: worker died" in written
    assert "Traceback" not in capsys.readouterr().err
    assert log.propagate and not log.handlers  # the logger is as it was after the job

    out = io.StringIO()
    ms = members()
    board = MemberBoard(ms, "val", Console(file=out, width=300), live=False, log_path=path)
    a = trial(ms[0])
    board.on_trial_recover(0, [], a)
    assert out.getvalue().strip().endswith(f"from its latest checkpoint (traceback in {path})")
    # with the job's storage named, the restart line names the copy there, made as it is printed
    kept = os.path.join(os.path.dirname(path), "storage", "ens", "logs", "run.log")
    out = io.StringIO()
    board = MemberBoard(ms, "val", Console(file=out, width=300), live=False, log_path=path, log_uri=kept)
    board.on_trial_recover(0, [], trial(ms[0]))
    assert out.getvalue().strip().endswith(f"(traceback in {kept})")
    assert open(kept).read() == open(path).read() and "RuntimeError: worker died" in open(kept).read()
