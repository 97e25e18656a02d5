"""Jobs in storage: one lease across instances, records any instance can read, a dead trainer never blocks training."""

from __future__ import annotations

import sys
import time

import pytest

from xray.jobs import (
    JobConflictError,
    JobStore,
    TrainingJob,
    TrainingJobs,
    TrainingLease,
    new_job_id,
    settings_environment,
)
from xray.settings import Settings
from xray.storage import LocalStorage, StorageError


def test_one_lease_at_a_time_until_released(storage):
    first, second = TrainingLease(storage, 60), TrainingLease(LocalStorage(storage.root), 60)
    held = first.acquire("job-a")
    assert held is not None and held.job_id == "job-a"
    assert second.acquire("job-b") is None
    renewed = first.renew(held)
    assert renewed is not None and renewed.expires_at >= held.expires_at
    assert first.release(held) is False  # the old ETag no longer matches: only the renewed lease can release
    assert first.release(renewed) is True
    assert second.acquire("job-b").job_id == "job-b"


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_renew(storage):
    dead = TrainingLease(storage, 0.2).acquire("dead-job")
    assert TrainingLease(storage, 60).acquire("new-job") is None
    time.sleep(0.3)
    taken = TrainingLease(storage, 60).acquire("new-job")
    assert taken is not None and taken.job_id == "new-job"
    assert TrainingLease(storage, 60).renew(dead) is None


def test_records_are_pruned_to_the_newest_but_never_an_active_one(storage):
    store = JobStore(storage, keep=2)
    ids = [f"20260101-00000{index}-abcdef" for index in range(5)]
    for index, job_id in enumerate(ids):
        store.save(TrainingJob(job_id=job_id, status="running" if index == 0 else "succeeded"))
    assert store.prune() == ids[1:3]
    assert store.job_ids() == [ids[0], ids[3], ids[4]]
    assert store.get("../../etc/passwd") is None and store.get(ids[0]).status == "running"


def jobs_with(storage, tmp_path, command, **settings) -> TrainingJobs:
    values = {"storage_uri": str(storage.root), "config_path": str(tmp_path / "unused.yaml")} | settings
    finished = []
    jobs = TrainingJobs(Settings(**values), storage, on_finished=finished.append, command=command)
    jobs.finished = finished
    return jobs


def test_a_sigkilled_training_process_is_marked_failed_and_frees_the_lease(storage, tmp_path):
    suicide = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    jobs = jobs_with(storage, tmp_path, suicide)
    job = jobs.start()
    ended = jobs.wait(job.job_id, timeout=60)
    assert ended.status == "failed" and "SIGKILL" in ended.error
    assert TrainingLease(storage, 60).read() is None
    assert [finished.job_id for finished in jobs.finished] == [job.job_id]


def test_a_second_start_anywhere_is_a_conflict_naming_the_running_job(storage, tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    first = jobs_with(storage, tmp_path, sleeper)
    other_instance = jobs_with(LocalStorage(storage.root), tmp_path, sleeper)
    job = first.start()
    try:
        with pytest.raises(JobConflictError) as conflict:
            other_instance.start()
        assert conflict.value.job.job_id == job.job_id
        assert other_instance.get(job.job_id).status == "queued"
    finally:
        first.stop(grace=5)
    assert first.get(job.job_id).status == "failed"
    assert other_instance.start().job_id != job.job_id
    other_instance.stop(grace=5)


def test_a_job_whose_trainer_vanished_is_reported_failed_once_its_lease_expires(storage, tmp_path):
    jobs = jobs_with(storage, tmp_path, ["true"], training_lease_seconds=1)
    job = TrainingJob(job_id=new_job_id(), status="running")
    jobs.store.save(job)
    assert jobs.lease.acquire(job.job_id) is not None
    assert jobs.get(job.job_id).status == "running"
    time.sleep(1.1)
    ended = jobs.get(job.job_id)
    assert ended.status == "failed" and "stopped renewing its lease" in ended.error


def test_the_training_process_gets_the_servers_settings_through_its_environment():
    environment = settings_environment(Settings(storage_uri="s3://bucket/x", model_poll_seconds=2.5, api_token=None))
    assert environment["XRAY_STORAGE_URI"] == "s3://bucket/x" and environment["XRAY_MODEL_POLL_SECONDS"] == "2.5"
    assert "XRAY_API_TOKEN" not in environment
    assert Settings.from_environment(environment).model_poll_seconds == 2.5


class FailingRecords(LocalStorage):
    """Local storage whose job-record writes fail, as an S3 outage would fail them."""

    def write_json(self, key, value):
        if key.startswith("jobs/") and key != "jobs/lease.json":
            raise StorageError(f"simulated outage writing {key}")
        return super().write_json(key, value)


def test_the_lease_is_freed_when_the_first_record_cannot_be_written(storage):
    from xray.jobs import exclusive_training

    failing = FailingRecords(storage.root)
    with pytest.raises(StorageError), exclusive_training(failing, Settings(), new_job_id()):
        pytest.fail("training must not start without its record")
    assert TrainingLease(storage, 60).read() is None, "nothing may block the next training"


def test_a_progress_record_that_cannot_be_written_does_not_stop_the_training(storage, monkeypatch, caplog):
    from xray.jobs import exclusive_training

    job_id = new_job_id()
    with exclusive_training(storage, Settings(), job_id) as (job, progress):
        monkeypatch.setattr(LocalStorage, "write_json", FailingRecords.write_json)
        progress({"stage": "model_trainer", "run_id": job_id})  # would raise before
        monkeypatch.undo()
    assert "could not record the progress" in caplog.text
    assert JobStore(storage).get(job_id).status == "succeeded"
    assert TrainingLease(storage, 60).read() is None
