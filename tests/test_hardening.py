"""Nothing lost, nothing surprising: checks before the model loads, failed saves, locks, leftovers,
the latent cache, resuming with changed settings, and the queue across processes."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import TinyHost, image_folder, quick_config
from trainer.training.control import TrainControl
from trainer.training.errors import InputError
from trainer.training.job import run_job

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _run(cfg, tmp_path, host=None, **kw):
    host = host or TinyHost("sd1", tmp_path / "out")
    return run_job(cfg, host=host, logs_dir=tmp_path / "logs", **kw), host


def _fail_writing(monkeypatch, io_module, file_name: str, code: int, text: str):
    """Make the network writer fail with ``OSError(code, text)`` for one file name; returns the real writer."""
    real_write = io_module.write_bytes

    def failing(path, blob):
        if Path(path).name == file_name:
            raise OSError(code, text)
        return real_write(path, blob)

    monkeypatch.setattr(io_module, "write_bytes", failing)
    return real_write


def _stop_at(n):
    """A control that asks the run to stop once step ``n`` is done."""
    control = TrainControl()

    def on_progress(event):
        if event.step == n and not event.message:
            control.stop()

    control.listen(on_progress=on_progress)
    return control


# --- everything is checked before the host's model is touched (issue 12 item 10, issue 11 item 7) ---


def _bad_caption(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    (data / "img1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return quick_config(lora_data_directory=str(data)), "img1.txt"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return quick_config(lora_data_directory=str(tmp_path / "empty")), "empty"


def _corrupt_images(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    return quick_config(lora_data_directory=str(tmp_path / "bad")), "a.png"


def _missing_folder(tmp_path):
    return quick_config(lora_data_directory=str(tmp_path / "nope")), "nope"


def _long_name(tmp_path):
    data = image_folder(tmp_path / "data", n=1)
    return quick_config(lora_data_directory=str(data), save_lora_name="n" * 300), "save_lora_name"


def _existing_step_file(tmp_path):
    data = image_folder(tmp_path / "data", n=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tiny_2steps.safetensors").write_bytes(b"user's file")
    return (quick_config(lora_data_directory=str(data), train_iterations="4", save_per_steps="2"),
            "tiny_2steps.safetensors")


def _missing_network_resume(tmp_path):
    data = image_folder(tmp_path / "data", n=1)
    return quick_config(lora_data_directory=str(data), network_resume=str(tmp_path / "x.safetensors")), \
        "network_resume"


CASES = {"caption not UTF-8": _bad_caption, "empty folder": _empty_folder, "only corrupt images": _corrupt_images,
         "missing folder": _missing_folder, "300-character name": _long_name,
         "existing <name>_<k>steps": _existing_step_file, "missing network_resume": _missing_network_resume}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_reported_before_the_model_loads(tmp_path, case):
    cfg, named = CASES[case](tmp_path)
    host = TinyHost("sd1", tmp_path / "out")
    with pytest.raises(ValueError if case not in ("300-character name", "existing <name>_<k>steps",
                                                  "missing network_resume") else InputError) as caught:
        run_job(cfg, host=host, logs_dir=tmp_path / "logs")
    assert named in str(caught.value)
    assert host.loads == 0 and host.restored == 0  # the host's model was never touched
    if case == "existing <name>_<k>steps":
        assert (tmp_path / "out" / "tiny_2steps.safetensors").read_bytes() == b"user's file"


def test_cli_bad_input_exits_2_with_one_line_before_loading(tmp_path, capsys):
    from trainer.cli import main

    cfg, _ = _bad_caption(tmp_path)
    path = cfg.to_json(tmp_path / "run.json")
    # the model does not exist either: the data problem is found first, without loading anything
    code = main(["train", str(path), "--set", f"model={tmp_path / 'no_model'}", "--output-dir",
                 str(tmp_path / "out"), "--logs-dir", str(tmp_path / "logs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "img1.txt" in err and "UTF-8" in err and "Traceback" not in err
    assert "Preparing the model" not in err


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_read_only_output_folder_is_refused_before_training(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "data", n=1)
    out = tmp_path / "ro"
    if _mount_tmpfs(out, "ro,size=1m"):
        try:
            cfg = quick_config(lora_data_directory=str(data))
            with pytest.raises(InputError, match="output folder .*ro is not writable: Read-only file system"):
                _run(cfg, tmp_path, host=TinyHost("sd1", out))
        finally:
            subprocess.run(["umount", str(out)])
    else:  # no permission to mount here: the same refusal through a writer that meets EROFS
        import trainer.training.preflight as pre

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(pre.tempfile, "mkstemp", read_only)
        with pytest.raises(InputError, match="not writable: Read-only file system"):
            _run(quick_config(lora_data_directory=str(data)), tmp_path, host=TinyHost("sd1", out))


def test_no_room_for_the_planned_files_is_refused_before_step_1(tmp_path, monkeypatch):
    import trainer.training.loop as loop
    import trainer.training.preflight as pre

    data = image_folder(tmp_path / "data", n=1)
    real = pre.shutil.disk_usage
    monkeypatch.setattr(pre.shutil, "disk_usage", lambda p: real(p)._replace(free=100 * 1024))
    steps = []
    monkeypatch.setattr(loop, "_one_step", lambda *a, **k: steps.append(1))
    cfg = quick_config(lora_data_directory=str(data), train_iterations="4", save_per_steps="2")
    with pytest.raises(InputError, match=r"has 0\.1 MiB free but this run saves 2 network file\(s\)"):
        _run(cfg, tmp_path)
    assert steps == []


# --- a failing save keeps the training (item 1) ---


@pytest.mark.slow
def test_failed_final_save_keeps_a_state_that_resume_only_saves(tmp_path, monkeypatch):
    import trainer.training.loop as loop
    import trainer.network.io as nio
    from trainer.cli.train import error_exit
    from trainer.training.loop import SaveFailed

    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="3", save_lora_name="keep")
    real_write = _fail_writing(monkeypatch, nio, "keep.safetensors", errno.ENOSPC, "No space left on device")
    with pytest.raises(SaveFailed) as caught:
        _run(cfg, tmp_path)
    state = tmp_path / "logs" / "state" / "keep.pt"
    text = str(caught.value)
    assert "keep.safetensors" in text and "No space left on device" in text and str(state) in text
    assert "only saves" in text and error_exit(caught.value) == (1, text)
    assert state.is_file() and torch.load(state, weights_only=False)["step"] == 3
    assert not list((tmp_path / "out").glob(".keep*.tmp"))

    monkeypatch.setattr(nio, "write_bytes", real_write)
    steps = []
    real_step = loop._one_step
    monkeypatch.setattr(loop, "_one_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    result, _ = _run(cfg, tmp_path, resume=True)
    assert steps == []  # nothing trained again: the resume only saved
    assert result.saved == [tmp_path / "out" / "keep.safetensors"] and result.saved[0].is_file()
    assert not state.exists()


# --- one run per name, across processes (item 2) ---


def _hold_lock_in_subprocess(lock_file: Path):
    code = textwrap.dedent(f"""
        import time
        from trainer.training.runlock import RunLock
        RunLock({str(lock_file)!r}, "training 'tiny'").acquire()
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_of_the_same_name_is_refused_and_a_crashed_one_does_not_block(tmp_path):
    data = image_folder(tmp_path / "data", n=1)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="1")
    (tmp_path / "out").mkdir()
    other = _hold_lock_in_subprocess(tmp_path / "out" / ".tiny.lock")
    try:
        host = TinyHost("sd1", tmp_path / "out")
        with pytest.raises(InputError, match=rf"'tiny' is already training \(training 'tiny', process {other.pid} on "):
            run_job(cfg, host=host, logs_dir=tmp_path / "logs")
        assert host.loads == 0
    finally:
        other.send_signal(signal.SIGKILL)  # a crash: its lock file stays behind
        other.wait()
    assert (tmp_path / "out" / ".tiny.lock").exists()
    result, _ = _run(cfg, tmp_path)
    assert result.saved[-1].name == "tiny.safetensors"
    assert not (tmp_path / "out" / ".tiny.lock").exists()


def test_two_runs_of_one_name_in_one_program_exclude_each_other(tmp_path):
    from trainer.training.runlock import RunLock

    data = image_folder(tmp_path / "data", n=1)
    with RunLock(tmp_path / "logs" / "state" / ".tiny.lock", "training 'tiny'"):
        with pytest.raises(InputError, match="already training"):
            _run(quick_config(lora_data_directory=str(data)), tmp_path)


# --- a fresh run keeps a stopped state (item 4), leftovers are cleaned (item 5) ---


def test_fresh_run_keeps_the_stopped_state_and_cleans_only_its_own_old_temporaries(tmp_path):
    data = image_folder(tmp_path / "data", n=1)
    out, state_dir = tmp_path / "out", tmp_path / "logs" / "state"
    out.mkdir()
    state_dir.mkdir(parents=True)
    (state_dir / "tiny.pt").write_bytes(b"a stopped run")
    old = [out / ".tiny.safetensors.k2j4x9_a.tmp", out / ".tiny_4steps.safetensors.q1w2e3r4.tmp",
           state_dir / ".tiny.pt.zz11yy22.tmp"]
    keep = [out / ".other.safetensors.k2j4x9_a.tmp", out / ".tiny-notes.txt", out / "tiny.tmp"]
    for p in old + keep:
        p.write_bytes(b"x" * 10)
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    # a run killed in the middle of writing its network leaves its temporary file behind
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from trainer.atomic import atomic_path
        with atomic_path({str(out / 'tiny.safetensors')!r}) as tmp:
            tmp.write_bytes(b"w" * 4096)
            print("writing", flush=True)
            time.sleep(120)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    killed = [p for p in out.glob(".tiny.safetensors.*.tmp") if p not in old]
    assert len(killed) == 1 and killed[0].stat().st_size == 4096
    old += killed
    time.sleep(0.05)
    live = out / ".tiny_2steps.safetensors.abcd1234.tmp"  # being written by someone right now
    live.write_bytes(b"y")
    os.utime(live, (time.time() + 3600, time.time() + 3600))
    logged = []
    result, _ = _run(quick_config(lora_data_directory=str(data), train_iterations="1"), tmp_path, control=TrainControl(on_log=logged.append))
    assert result.saved[-1].is_file()
    assert (state_dir / "tiny.pt").read_bytes() == b"a stopped run"  # not deleted by the fresh run
    assert any("a stopped run of 'tiny' exists" in m and "resume" in m for m in logged)
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in keep) and live.exists()
    assert any("removed 4 temporary file(s)" in m for m in logged)


# --- the latent cache survives torn files (item 6) ---


@pytest.mark.slow
def test_torn_and_empty_latent_cache_files_are_recomputed_with_a_warning(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    cfg = quick_config(lora_data_directory=str(data), train_iterations="1", cache_latents_to_disk=True,
                       save_overwrite=True)
    _run(cfg, tmp_path)
    files = sorted((tmp_path / "logs" / "cache").glob("*.pt"))
    assert len(files) == 2 and not list((tmp_path / "logs" / "cache").glob(".*"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # torn
    files[1].write_bytes(b"")  # 0 bytes
    logged = []
    result, _ = _run(cfg, tmp_path, control=TrainControl(on_log=logged.append))
    assert result.saved[-1].is_file()
    for f in files:
        assert any(f"latent cache file {f}" in m and "encoding the image again" in m for m in logged), logged
        assert torch.load(f, weights_only=True)["latent"].dim() == 3  # rewritten whole


# --- resuming with changed settings (item 7) and broken states (item 8) ---


@pytest.fixture
def stopped_run(tmp_path):
    data = image_folder(tmp_path / "data", n=2)
    common = dict(lora_data_directory=str(data), train_iterations="4", logging_save_csv=True,
                  save_lora_name="part", train_lr_scheduler="constant")
    first, _ = _run(quick_config(**common), tmp_path, control=_stop_at(2))
    assert first.stopped and first.steps == 2
    return common, first


def test_resume_refuses_settings_that_cannot_change_and_lists_them(tmp_path, stopped_run, capsys):
    from trainer.cli import main

    common, _ = stopped_run
    state = tmp_path / "logs" / "state" / "part.pt"
    before = state.read_bytes()
    host = TinyHost("sd1", tmp_path / "out")
    changed = quick_config(**{**common, "network_rank": "8", "network_type": "loha"})
    with pytest.raises(InputError) as caught:
        run_job(changed, host=host, logs_dir=tmp_path / "logs", resume=True)
    text = str(caught.value)
    assert "network_rank: '4' -> '8'" in text and "network_type: 'lierla' -> 'loha'" in text
    assert "train_iterations" in text  # named among those that may change
    assert host.loads == 0 and state.read_bytes() == before

    # another mode, from the command line: exit 2, the mode named, no traceback
    ileco = quick_config(**{**common, "mode": "iLECO", "original prompt": "a cat"}).to_json(tmp_path / "i.json")
    code = main(["train", str(ileco), "--resume", "--output-dir", str(tmp_path / "out"), "--logs-dir",
                 str(tmp_path / "logs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "mode: 'LoRA' -> 'iLECO'" in err and "Traceback" not in err
    assert state.read_bytes() == before


@pytest.mark.slow
def test_resume_takes_iterations_and_learning_rate_from_the_new_request(tmp_path, stopped_run):
    common, first = stopped_run
    logged = []
    new = quick_config(**{**common, "train_iterations": "6", "train_learning_rate": "5e-4"})
    second, _ = _run(new, tmp_path, resume=True, control=TrainControl(on_log=logged.append))
    assert not second.stopped and second.steps == 6
    assert any("taken from this request" in m and "train_iterations: '4' -> '6'" in m
               and "train_learning_rate" in m for m in logged), logged
    rows = list(csv.reader(open(second.csv_paths[0], encoding="utf-8")))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Step")
    steps = rows[head + 1:]
    assert [int(r[0]) for r in steps] == [1, 2, 3, 4, 5, 6]
    assert float(steps[1][4]) == pytest.approx(1e-3) and float(steps[2][4]) == pytest.approx(5e-4)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 torn zip", "foreign"], ids=["empty", "torn", "foreign"])
def test_unusable_state_file_is_named_with_how_to_start_over(tmp_path, content):
    from trainer.training.runlog import StateError

    data = image_folder(tmp_path / "data", n=1)
    state = tmp_path / "logs" / "state" / "tiny.pt"
    state.parent.mkdir(parents=True)
    if content == "foreign":
        torch.save({"weights": torch.zeros(2)}, state)
    else:
        state.write_bytes(content)
    host = TinyHost("sd1", tmp_path / "out")
    with pytest.raises(StateError) as caught:
        run_job(quick_config(lora_data_directory=str(data)), host=host, logs_dir=tmp_path / "logs",
                resume=True)
    text = str(caught.value)
    assert str(state) in text and "start over" in text and "run without resume" in text
    assert host.loads == 0


# --- the queue across processes (item 11) ---


@pytest.mark.slow
def test_one_program_runs_the_queue_and_a_dead_owners_job_can_be_requeued(tmp_path, capsys):
    from trainer.cli import main
    from trainer.training.queue import JobQueue, QueueError

    data = image_folder(tmp_path / "data", n=1)
    qfile = tmp_path / "queue.json"
    queue = JobQueue(qfile)
    queue.add(quick_config(lora_data_directory=str(data), save_lora_name="first"))
    queue.add(quick_config(lora_data_directory=str(data), save_lora_name="second"))
    code = textwrap.dedent(f"""
        import sys, time
        from trainer.training.queue import JobQueue

        class SlowHost:  # its model takes forever to load: the job stays 'running'
            def load(self, config):
                print("loading", flush=True)
                time.sleep(120)
            def restore(self):
                pass
            def lora_dir(self):
                return {str(tmp_path / 'out')!r}

        JobQueue({str(qfile)!r}).run_pending(host=SlowHost(), logs_dir={str(tmp_path / 'logs')!r})
    """)
    other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "loading"
        args = ["queue", "--queue-file", str(qfile)]
        assert main(args + ["run", "--output-dir", str(tmp_path / "out2")]) == 2
        err = capsys.readouterr().err
        assert f"is being run by running the queue, process {other.pid}" in err
        assert [(i.name, i.status) for i in JobQueue(qfile, recover=True).items()] == [
            ("first", "running"), ("second", "pending")]  # the live job is left alone
        assert main(args + ["list"]) == 0
        assert f"process {other.pid}" in capsys.readouterr().out
        with pytest.raises(QueueError, match="training now"):
            queue.remove(1)
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    assert main(args + ["list"]) == 0
    listed = capsys.readouterr().out
    assert "  1  stopped" in listed and "interrupted: the program running this job ended" in listed
    assert queue.requeue(1).status == "pending"
    assert main(args + ["remove", "1"]) == 0
    assert [i.name for i in queue.items()] == ["second"]


def test_a_host_can_check_the_model_name_before_anything_loads(tmp_path):
    from trainer.hosts.base import ModelLoadError
    from trainer.cli.train import error_exit

    class CheckingHost(TinyHost):
        def check(self, config):
            raise ModelLoadError(f"model {config.model!r} is not in the checkpoint list")

    data = image_folder(tmp_path / "data", n=1)
    host = CheckingHost("sd1", tmp_path / "out")
    with pytest.raises(ModelLoadError) as caught:
        run_job(quick_config(lora_data_directory=str(data), model="gone.safetensors"), host=host,
                logs_dir=tmp_path / "logs")
    assert host.loads == 0 and error_exit(caught.value)[0] == 2
    assert not (tmp_path / "out" / ".tiny.lock").exists()  # the run's lock was given back


@pytest.mark.slow
def test_stop_save_never_replaces_someone_elses_file_and_a_failing_periodic_save_keeps_the_state(
        tmp_path, monkeypatch):
    import trainer.network.io as nio
    from trainer.training.loop import SaveFailed

    data = image_folder(tmp_path / "data", n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny_2steps.safetensors").write_bytes(b"user's file")  # not a planned save: no save_per_steps
    result, _ = _run(quick_config(lora_data_directory=str(data), train_iterations="4"), tmp_path, control=_stop_at(2))
    assert result.stopped and result.saved == [out / "tiny_2steps-2.safetensors"]
    assert (out / "tiny_2steps.safetensors").read_bytes() == b"user's file"

    _fail_writing(monkeypatch, nio, "mid_2steps.safetensors", errno.EROFS, "Read-only file system")
    cfg = quick_config(lora_data_directory=str(data), train_iterations="4", save_per_steps="2",
                       save_lora_name="mid")
    with pytest.raises(SaveFailed, match=r"mid_2steps\.safetensors: Read-only file system\. Nothing learned is "
                                         r"lost.*resume it to continue from step 2"):
        _run(cfg, tmp_path)
    assert torch.load(tmp_path / "logs" / "state" / "mid.pt", weights_only=False)["step"] == 2
