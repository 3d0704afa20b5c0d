"""The worker's side of a sweep: one trial in a Ray worker, on any node (`pruning_trial`, the
function Tune runs).

Everything a trial leaves for others goes to the sweep's storage (`<storage>/<sweep>/resume/`),
which every node reaches: its latest resume state (`<trial_id>.pt`, replaced whole) and, once
done, its artifacts (`<trial_id>.final/`, read by the driver and kept until the sweep ends). Tune
holds no checkpoint of it: a trial restarted by Tune (a resume, or a retry after its worker or
node died) continues from that state.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray import tune

from prunetune import search
from prunetune.errors import error_text, first_line
from prunetune.spec import LoadedSpec, Spec
from prunetune.storage import Storage, unreachable
from prunetune.sweep.paths import SweepPaths
from prunetune.sweep.protocol import (
    EPOCHS_KEY,
    ERROR_KEY,
    FINAL_FLAG,
    GPUS_KEY,
    NODE_ID_KEY,
    NODE_KEY,
    PHASE_KEY,
    RESUMED_KEY,
    pack,
    tune_metrics,
)

log = logging.getLogger(__name__)


def pruning_trial(config: dict, *, loaded: LoadedSpec, shared: dict, storage: str, sweep: str,
                  teachers: dict[str, str], cpus: float, checkpoint_s: float, storage_wait_s: float) -> None:
    """One trial in a Ray worker: `config` is what Optuna sampled (and the replicate's index);
    `loaded` the sweep's spec, already loaded and checked on the driver, which the trial's own
    spec is resolved from, once.

    The trial's own failure (an exception, a non-finite loss) is reported as its final result
    with `ERROR_KEY`, not raised: Tune retries what it sees raised, which is then only the death
    of a worker or a node.

    `shared`: the driver's dataset (`dataset`, read-only shared memory) and the data spec it was
    loaded for (`data`); a trial whose data spec differs (a searched data key) loads its own.
    `teachers`: each distillation teacher → its folder in the sweep's storage. `storage_wait_s`:
    how long each storage operation waits for a remote store that does not answer; past that the
    trial raises, and Tune retries it from its last saved state."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    root = Storage(storage, wait_s=storage_wait_s)
    saved = root.child(sweep).child(SweepPaths.RESUME)
    tid = tune.get_context().get_trial_id()
    report = _Reporter(_where(), tune_metrics(loaded.fixed_spec().search.objectives))
    final_rel = f"{tid}.final"
    if saved.exists(f"{final_rel}/complete"):
        _report_finished_again(saved, final_rel, report)
        return
    work = Path(tempfile.mkdtemp(prefix=f"prunetune-{tid}-"))
    uploads = _StateUploads(saved, f"{tid}.pt")
    try:
        run = _Run(config, loaded, shared, teachers, root, sweep, uploads, work, report, checkpoint_s)
        result = run.train()
        if result is None:
            return  # its own failure, reported
        uploads.wait()  # before the state is deleted: no upload may bring it back
        saved.put_dir(work / "final", final_rel)
        saved.write_text(f"{final_rel}/complete", "ok\n")  # last: the artifacts are all there
        saved.delete(f"{tid}.pt")
        report.final(result.metrics, result.final_step)
    finally:
        # Not waiting for an upload here: a trial stopped early (ASHA) must end within Tune's 2 s
        # for its worker to be reused; its upload ends by itself (its file may be gone: skipped).
        shutil.rmtree(work, ignore_errors=True)


def _where() -> dict:
    """Where this trial runs: the node's IP and Ray id, and the GPUs Ray gave it."""
    ctx = ray.get_runtime_context()
    return {NODE_KEY: ray.util.get_node_ip_address(), NODE_ID_KEY: ctx.get_node_id(),
            GPUS_KEY: ",".join(str(g) for g in ray.get_gpu_ids())}


@dataclasses.dataclass(frozen=True)
class _Reporter:
    """A trial's reports to Tune: each with where the trial runs (`where`), and its numbers other
    than those Tune reads (`keep`) packed (`protocol.pack`)."""

    where: dict
    keep: frozenset[str]

    def __call__(self, report: dict) -> None:
        tune.report(pack({**report, **self.where}, self.keep))

    def final(self, metrics: dict, epoch: int) -> None:
        self({**metrics, FINAL_FLAG: True, "epoch": epoch})


def _report_finished_again(saved: Storage, final_rel: str, report: _Reporter) -> None:
    """The trial had finished when the driver died, before Tune recorded it: report its history
    again (the driver may not have written all of it) and its final result."""
    from prunetune.reports import epoch_reports, final_step

    history = saved.read_json(f"{final_rel}/artifacts/history.json")
    for metrics, epoch in epoch_reports(history):
        report({**metrics, "epoch": epoch})
    report.final(saved.read_json(f"{final_rel}/artifacts/metrics.json"), final_step(history))


class _StateUploads:
    """A trial's resume state goes to the sweep's storage in the background, one upload at a time,
    so training never waits for the store (a slow S3, or one that stopped answering): a save that
    comes due while the last upload still runs is skipped, and the next due epoch saves again. A
    PUT is whole, so the stored state is always one complete save."""

    def __init__(self, saved: Storage, rel: str):
        self.saved, self.rel = saved, rel
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None  # an upload's error other than the store not answering

    def idle(self) -> bool:
        """No upload runs; raises what the last one raised, unless the store did not answer."""
        if self._error is not None:
            raise self._error
        return self._thread is None or not self._thread.is_alive()

    def start(self, local: Path) -> None:
        self._thread = threading.Thread(target=self._upload, args=(local,), daemon=True, name="prunetune-state")
        self._thread.start()

    def _upload(self, local: Path) -> None:
        try:
            self.saved.put_file(local, self.rel)
        except OSError as exc:
            if not local.exists():
                return  # the trial has ended (stopped early) and its folder is gone
            if not unreachable(exc):
                self._error = exc  # raised in the trial's own thread (access denied, a full disk...)
                return
            log.warning("trial state %s not saved, the store did not answer (%s); the next due epoch "
                        "saves it again", self.rel, first_line(exc)[:300])
        finally:
            local.unlink(missing_ok=True)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.idle()  # its error, if any

    def resume_from(self, local: Path) -> Path | None:
        """The stored state, fetched to `local`, or None when there is none."""
        return self.saved.get_file(self.rel, local) if self.saved.exists(self.rel) else None


class _Run:
    """One trial's training in the worker, reporting each epoch to Tune. Its state is saved at an
    epoch end when `checkpoint_s` seconds have passed since the last save (0: every epoch) and the
    last upload is done (`_StateUploads`); a resumed trial reports its history again (the driver
    skips what it has)."""

    def __init__(self, config: dict, loaded: LoadedSpec, shared: dict, teachers: dict[str, str], root: Storage,
                 sweep: str, uploads: _StateUploads, work: Path, report: _Reporter, checkpoint_s: float):
        self.config, self.loaded, self.shared, self.teachers = config, loaded, shared, teachers
        self.root, self.sweep, self.uploads = root, sweep, uploads
        self.work, self.report, self.checkpoint_s = work, report, checkpoint_s
        self.last_save, self.saved_epoch = time.monotonic(), -1
        self.trial = None

    def train(self):
        """The trial's result, or None when it failed by its own error (reported as its final
        result)."""
        from prunetune.cache import DenseCache
        from prunetune.trial import Trial

        try:
            spec = search.spec_of(self.loaded, self.config)
            self.trial = Trial(spec, teacher_dir=self._teacher(spec), dataset=self._dataset(spec),
                               rewind_epochs=self.loaded.rewind_points(), on_epoch=self.on_epoch)
            resume_from = self.uploads.resume_from(self.work / "resume.pt")
            return self.trial.run(self.work / "final" / "artifacts", DenseCache(self.root.child("_dense")),
                                  resume_from=resume_from)
        except Exception as exc:  # noqa: BLE001 - the trial's own failure: reported, not retried
            if unreachable(exc):
                raise  # the sweep's storage stayed away: not the trial's fault, Tune retries it
            epoch = self.trial.trainer.epoch if self.trial is not None else 0
            epoch = getattr(exc, "epoch", epoch)  # a non-finite loss: the epoch it happened in
            self.report({FINAL_FLAG: True, ERROR_KEY: error_text(exc), "epoch": epoch})
            return None

    def _teacher(self, spec: Spec) -> Path | None:
        """The distillation teacher's files, from the sweep's storage (a local copy where remote)."""
        if spec.distill is None:
            return None
        teacher = self.root.child(self.sweep).child(self.teachers[spec.distill.teacher])
        return teacher.local_path() if teacher.is_local else teacher.get_dir("", self.work / "teacher")

    def _dataset(self, spec: Spec):
        """The driver's shared dataset where the trial's data spec is the one it was loaded for."""
        return self.shared["dataset"] if spec.data.model_dump(mode="json") == self.shared["data"] else None

    def on_epoch(self, epoch) -> None:
        """`Trial`'s event per epoch (`reports.Epoch`): save the state when due, then report to Tune."""
        if epoch.save is not None and epoch.index > self.saved_epoch and self.uploads.idle() and \
                time.monotonic() - self.last_save >= self.checkpoint_s:
            local = self.work / f"trial-{epoch.index}.pt"
            epoch.save(local)
            self.uploads.start(local)
            self.last_save, self.saved_epoch = time.monotonic(), epoch.index
        resumed = {} if epoch.resumed_from_epoch is None else {RESUMED_KEY: epoch.resumed_from_epoch}
        self.report({**epoch.metrics, **resumed, EPOCHS_KEY: epoch.planned_epochs, PHASE_KEY: epoch.phase,
                     "epoch": epoch.index})
