"""The persisted job queue: file round trip, duplicate names, deletion anywhere, failures and stops."""

from __future__ import annotations

import json
import threading

import pytest

from helpers import TinyHost, image_folder, quick_config
from trainer.training.control import TrainControl
from trainer.training.queue import JobQueue, QueueError


@pytest.fixture
def data(tmp_path):
    return image_folder(tmp_path / "data", n=2)


def _cfg(data, name, **values):
    values = {"train_iterations": "2", **values}
    return quick_config(lora_data_directory=str(data), save_lora_name=name, **values)


def test_items_persist_and_reload(tmp_path, data):
    path = tmp_path / "q" / "queue.json"
    queue = JobQueue(path)
    first = queue.add(_cfg(data, "one"))
    second = queue.add(_cfg(data, "two", network_rank="8"))
    assert (first.id, second.id) == (1, 2)

    again = JobQueue(path).items()  # a fresh object, as after a restart
    assert [(i.id, i.name, i.mode, i.status) for i in again] == [(1, "one", "LoRA", "pending"),
                                                                 (2, "two", "LoRA", "pending")]
    assert again[1].config["network_rank"] == "8"
    assert again[1].config["lora_data_directory"] == str(data)
    assert json.loads(path.read_text(encoding="utf-8"))["version"] == 1


def test_duplicate_name_is_refused_but_equal_other_settings_are_not(tmp_path, data):
    queue = JobQueue(tmp_path / "queue.json")
    # The reference compared train_lr_scheduler_settings (usually empty): these two would clash there.
    queue.add(_cfg(data, "alpha"))
    queue.add(_cfg(data, "beta"))
    with pytest.raises(QueueError, match="Duplicated LoRA name!.*item 1 \\(pending\\).*'alpha'"):
        queue.add(_cfg(data, "alpha", train_lr_scheduler_settings="x=1"))
    with pytest.raises(QueueError, match="the run now training saves as 'gamma'"):
        queue.add(_cfg(data, "gamma"), busy_names=("gamma",))
    # A blank name saves as 'untitled', so two blank names clash too.
    queue.add(_cfg(data, ""))
    with pytest.raises(QueueError, match="'untitled'"):
        queue.add(_cfg(data, ""))
    assert [i.name for i in queue.items()] == ["alpha", "beta", "untitled"]


def test_incomplete_settings_are_refused_with_the_reason(tmp_path):
    queue = JobQueue(tmp_path / "queue.json")
    with pytest.raises(QueueError, match="lora_data_directory is empty"):
        queue.add(quick_config(save_lora_name="nodata"))
    assert queue.items() == []


def test_delete_any_item_including_the_first(tmp_path, data):
    queue = JobQueue(tmp_path / "queue.json")
    for name in ("a", "b", "c"):
        queue.add(_cfg(data, name))
    assert queue.remove(1).name == "a"
    assert queue.remove("3").name == "c"
    assert [i.name for i in JobQueue(tmp_path / "queue.json").items()] == ["b"]
    with pytest.raises(QueueError, match="queue item 7 does not exist \\(ids: 2\\)"):
        queue.remove(7)
    with pytest.raises(QueueError, match="'x' is not a queue item id"):
        queue.remove("x")
    # Once the name is free again, it can be queued again.
    assert queue.add(_cfg(data, "a")).id == 3


def test_running_item_cannot_be_deleted_and_is_recovered_after_a_restart(tmp_path, data):
    path = tmp_path / "queue.json"
    queue = JobQueue(path)
    queue.add(_cfg(data, "busy"))
    queue._run_lock.acquire()  # this program runs the queue now
    assert queue._claim_next().status == "running"
    with pytest.raises(QueueError, match="training now; press Stop"):
        queue.remove(1)
    assert JobQueue(path).items()[0].status == "running"  # a reader leaves it alone
    assert JobQueue(path, recover=True).items()[0].status == "running"  # and so does a new page: it is live
    queue._run_lock.release()  # the program ended
    recovered = JobQueue(path, recover=True).items()[0]
    assert recovered.status == "stopped" and "the program running this job ended" in recovered.message
    assert queue.requeue(1).status == "pending"


def test_unreadable_queue_file_names_the_file(tmp_path):
    path = tmp_path / "queue.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(QueueError, match="queue.json: not a readable queue file"):
        JobQueue(path).items()


@pytest.mark.slow
def test_failing_job_is_marked_and_the_rest_still_run(tmp_path, data):
    queue = JobQueue(tmp_path / "queue.json")
    queue.add(_cfg(data, "good1", logging_save_csv=True))
    queue.add(_cfg(tmp_path / "missing_folder", "bad"))
    queue.add(_cfg(data, "good2"))
    seen = []
    host = TinyHost("sd1", tmp_path / "out")
    done = queue.run_pending(host=host, logs_dir=tmp_path / "logs",
                             on_item=lambda i: seen.append((i.id, i.status)))
    assert [(i.name, i.status) for i in done] == [("good1", "done"), ("bad", "failed"), ("good2", "done")]
    items = {i.name: i for i in queue.items()}
    assert "missing_folder" in items["bad"].message and items["bad"].message.startswith("Error: ")
    assert items["good1"].message.startswith("Finished: saved ")
    assert (tmp_path / "out" / "good1.safetensors").is_file()
    assert (tmp_path / "out" / "good2.safetensors").is_file()
    assert all(i.started and i.finished and i.finished >= i.started for i in items.values())
    assert seen[:2] == [(1, "running"), (1, "done")] and len(seen) == 6
    assert host.loads == 2 and host.restored == 2  # the bad item stopped before touching the model


@pytest.mark.slow
def test_stop_ends_the_job_and_the_queue_run_and_a_new_run_continues(tmp_path, data):
    queue = JobQueue(tmp_path / "queue.json")
    queue.add(_cfg(data, "first", train_iterations="3"))
    queue.add(_cfg(data, "second"))

    control = TrainControl()

    def stop_at_step_1(event):
        if event.step == 1 and not event.message:
            control.stop()

    control.listen(on_progress=stop_at_step_1)
    host = TinyHost("sd1", tmp_path / "out")
    worker = threading.Thread(target=queue.run_pending,
                              kwargs=dict(host=host, logs_dir=tmp_path / "logs", control=control))
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    first, second = queue.items()
    assert first.status == "stopped" and "Stopped at step 1" in first.message
    assert (tmp_path / "out" / "first_1steps.safetensors").is_file()
    assert second.status == "pending"

    done = queue.run_pending(host=host, logs_dir=tmp_path / "logs")
    assert [(i.name, i.status) for i in done] == [("second", "done")]


def test_queue_command_line(tmp_path, data, capsys):
    from trainer.cli import main

    settings = _cfg(data, "cli_item").to_json(tmp_path / "cli_item.json")
    qfile = str(tmp_path / "queue.json")
    assert main(["queue", "--queue-file", qfile, "add", str(settings)]) == 0
    assert "Added to Queue: item 1 ('cli_item', LoRA)" in capsys.readouterr().out
    assert main(["queue", "--queue-file", qfile, "add", str(settings)]) == 2
    assert "Duplicated LoRA name!" in capsys.readouterr().err
    assert main(["queue", "--queue-file", qfile, "list"]) == 0
    assert "pending" in capsys.readouterr().out
    assert main(["queue", "--queue-file", qfile, "remove", "1"]) == 0
    assert JobQueue(qfile).items() == []
