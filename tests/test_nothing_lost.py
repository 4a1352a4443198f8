"""Nothing a user made is ever lost (issue 27): atomic writes that never replace a file, one
writer per workdir, imports that set old checkpoints aside only once the new one is complete,
exports that never overwrite, and a failed background checkpoint save that stops training
with exit status 4 and one line.

In-process where possible (`main.execute`, the io functions with faults injected at every
step); one subprocess batch kills an import and an export at random moments.
"""

import errno
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import main as main_lib
from score_sde.io import checkpoints, files, torch_zip
from score_sde.io import workdir as workdir_lib
from score_sde.run import experiment, programs
from score_sde.run import reference as rc
from test_bad_input import execute, snapshot
from test_train import REPO, tiny_config, trained  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny run without training: checkpoints 2 and 4 of an initialized state, its
  config.json, and the same weights exported as a score_sde_pytorch file (`export.pth`)."""
  workdir = str(tmp_path_factory.mktemp("lost") / "run")
  config = tiny_config()
  spec = experiment.run_spec(config)
  state = jax.jit(lambda k: programs.init_state(k, spec))(jax.random.PRNGKey(0))
  with checkpoints.get_manager(workdir, keep=3) as manager:
    for step in (2, 4):
      checkpoints.save(manager, step, state.replace(step=jnp.asarray(step, jnp.int32)))
  workdir_lib.save_config(experiment.config_to_plain(config), workdir)
  host = jax.device_get(state)
  exported = os.path.join(os.path.dirname(workdir), "export.pth")
  torch_zip.save(rc.export_state(config, host.params, host.ema_params, host.constants, 9),
                 exported)
  return workdir, exported


def copy_run(run_dir, tmp_path, name="run"):
  target = str(tmp_path / name)
  shutil.copytree(run_dir[0], target)
  return target


# ----------------------------------------------------------------------------------------
# Atomic writes.


def test_write_atomic_never_replaces_and_leaves_no_torn_file(tmp_path):
  path = str(tmp_path / "out.bin")
  files.write_atomic(path, lambda f: f.write(b"first"))
  with pytest.raises(FileExistsError, match=r"out\.bin already exists; pass --force"):
    files.write_atomic(path, lambda f: f.write(b"second"), flag="--force")
  assert open(path, "rb").read() == b"first"

  def interrupted(f):
    f.write(b"half")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    files.write_atomic(path, interrupted, overwrite=True)
  assert open(path, "rb").read() == b"first" and os.listdir(tmp_path) == ["out.bin"]
  files.write_atomic(path, lambda f: f.write(b"second"), overwrite=True)
  assert open(path, "rb").read() == b"second" and os.listdir(tmp_path) == ["out.bin"]


def test_config_json_kept_when_a_run_changes_it(tmp_path):
  plain = experiment.config_to_plain
  workdir_lib.save_config(plain(tiny_config()), str(tmp_path))
  old = open(tmp_path / "config.json", "rb").read()
  moved = workdir_lib.save_config(plain(tiny_config(**{"training.n_iters": 8})), str(tmp_path))
  assert open(moved, "rb").read() == old  # the same bytes, linked before the replacement
  assert json.load(open(tmp_path / "config.json"))["training"]["n_iters"] == 8
  assert sorted(os.listdir(tmp_path)) == ["config.1.json", "config.json"]


# ----------------------------------------------------------------------------------------
# One writer per workdir.


def _lock(workdir, mode="train", **holder):
  record = dict(host=holder.pop("host", __import__("socket").gethostname()), mode=mode,
                since="2026-01-01T00:00:00", **holder)
  with open(os.path.join(workdir, workdir_lib.lock_file(mode)), "w") as f:
    json.dump(record, f)


@pytest.mark.parametrize("mode", ["train", "sample", "eval"])
def test_second_writer_is_refused(run_dir, tmp_path, capsys, mode):
  workdir = copy_run(run_dir, tmp_path)
  _lock(workdir, mode, pid=os.getppid())  # a live process of this host
  before = snapshot(workdir)
  status, line, compiles = execute(capsys, tiny_config(), workdir, mode)
  assert status == 2 and compiles == 0, line
  assert line.startswith(f"error: --workdir={workdir} is in use by {mode} process "
                         f"{os.getppid()} on host "), line
  assert snapshot(workdir) == before


def test_a_training_run_can_be_sampled_and_evaluated_but_not_imported_into(tmp_path):
  workdir = str(tmp_path)
  _lock(workdir, "train", pid=os.getppid())
  with workdir_lib.locked(workdir, "sample"), workdir_lib.locked(workdir, "eval"):
    assert sorted(os.listdir(tmp_path)) == ["lock.eval.json", "lock.json", "lock.sample.json"]
  with pytest.raises(workdir_lib.WorkdirBusyError, match="in use by train process"):
    with workdir_lib.locked(workdir, "import"):
      pass
  assert os.listdir(tmp_path) == ["lock.json"]


def test_lock_of_another_host_is_refused_and_a_stale_one_taken_over(tmp_path, caplog):
  workdir = str(tmp_path)
  _lock(workdir, pid=1, host="elsewhere")
  with pytest.raises(workdir_lib.WorkdirBusyError, match="on host elsewhere"):
    with workdir_lib.locked(workdir, "import"):
      pass
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _lock(workdir, pid=dead.pid)
  with caplog.at_level(logging.WARNING), workdir_lib.locked(workdir, "train"):
    held = json.load(open(tmp_path / workdir_lib.LOCK_FILE))
    assert held["pid"] == os.getpid() and held["mode"] == "train"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"train process {os.getpid()}"):
      with workdir_lib.locked(workdir, "import"):  # not re-entrant: a second writer
        pass
  assert f"stale lock {tmp_path / workdir_lib.LOCK_FILE} of process {dead.pid}" in caplog.text
  assert os.listdir(tmp_path) == []  # released, and nothing else left


def test_symlinked_checkpoints_leaving_the_workdir_are_refused(run_dir, tmp_path, capsys):
  other = copy_run(run_dir, tmp_path, "other")
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  os.symlink(os.path.join(other, "checkpoints"), os.path.join(workdir, "checkpoints"))
  before = snapshot(other)
  status, line, compiles = execute(capsys, tiny_config(), workdir, "train")
  assert status == 2 and compiles == 0, line
  assert "checkpoints (its checkpoints) is a symlink to" in line and "outside" in line, line
  with pytest.raises(ValueError, match="set-aside folder"):
    os.makedirs(os.path.join(tmp_path, "aside"))
    os.symlink(os.path.join(tmp_path, "aside"),
               os.path.join(other, checkpoints.SET_ASIDE_DIR))
    checkpoints.set_aside(other, [4], "test")
  assert snapshot(other)["checkpoints/4/_CHECKPOINT_METADATA"] == before[
      "checkpoints/4/_CHECKPOINT_METADATA"]


# ----------------------------------------------------------------------------------------
# Import and export.


def _steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_import_refuses_another_runs_files_and_overwrite_sets_them_aside(run_dir, tmp_path):
  workdir = copy_run(run_dir, tmp_path)
  config, exported = tiny_config(), run_dir[1]
  before = snapshot(workdir)
  with pytest.raises(FileExistsError, match=r"already holds checkpoints .*--overwrite"):
    rc.import_checkpoint(config, exported, workdir)
  shutil.move(os.path.join(workdir, "checkpoints"), str(tmp_path / "moved"))
  with pytest.raises(FileExistsError, match=r"config.json holds another run's config"):
    rc.import_checkpoint(tiny_config(**{"training.n_iters": 8}), exported, workdir)
  shutil.move(str(tmp_path / "moved"), os.path.join(workdir, "checkpoints"))
  assert snapshot(workdir) == before
  assert rc.import_checkpoint(tiny_config(**{"training.n_iters": 8}), exported, workdir,
                              overwrite=True) == 9
  assert _steps(workdir) == [9]
  aside = os.path.join(workdir, checkpoints.SET_ASIDE_DIR, "checkpoints.before_import")
  assert {k: v for k, v in snapshot(aside).items()} == {
      k[len("checkpoints/"):]: v for k, v in before.items() if k.startswith("checkpoints/")}
  assert open(os.path.join(workdir, "config.1.json"), "rb").read() == open(
      os.path.join(run_dir[0], "config.json"), "rb").read()
  assert not any(n.startswith((".import-", workdir_lib.IMPORT_MARKER, "lock"))
                 for n in os.listdir(workdir))


def test_import_interrupted_at_every_step_of_its_finish(run_dir, tmp_path, monkeypatch):
  """A KeyboardInterrupt at the k-th file operation (exchange, rename, link, replace,
  unlink) that puts a complete import in place, for every k: the workdir holds the old
  checkpoints or the new one (never neither), and the next holder of the lock finishes the
  import. One import is staged; each k starts from a copy of that pending workdir."""
  calls, fail_at = [], [0]

  def counted(name, real):
    def op(*args, **kwargs):
      if fail_at[0] is not None:
        calls.append(name)
        if len(calls) == fail_at[0] + 1:
          raise KeyboardInterrupt
      return real(*args, **kwargs)
    return op

  for name in ("rename", "link", "replace", "unlink"):
    monkeypatch.setattr(os, name, counted(name, getattr(os, name)))
  monkeypatch.setattr(workdir_lib, "exchange", counted("exchange", workdir_lib.exchange))
  real_finish, armed = workdir_lib.finish_import, [False]

  def finish(w):  # the import's own finish, once staged, is interrupted at its first step
    if armed[0] and os.path.exists(os.path.join(w, workdir_lib.IMPORT_MARKER)):
      armed[0] = False
      calls.clear()
      fail_at[0] = 0
      try:
        return real_finish(w)
      finally:
        fail_at[0] = None
    return real_finish(w)

  monkeypatch.setattr(workdir_lib, "finish_import", finish)
  pending = copy_run(run_dir, tmp_path, "pending")
  old = snapshot(os.path.join(pending, "checkpoints"))
  armed[0], fail_at[0] = True, None
  with pytest.raises(KeyboardInterrupt):  # at the exchange: the import is staged, pending
    rc.import_checkpoint(tiny_config(), run_dir[1], pending, overwrite=True)
  assert snapshot(os.path.join(pending, "checkpoints")) == old
  assert os.path.exists(os.path.join(pending, workdir_lib.IMPORT_MARKER))
  k = 0
  while True:
    workdir = str(tmp_path / f"run{k}")
    shutil.copytree(pending, workdir, symlinks=True)
    calls.clear()
    fail_at[0] = k
    try:
      real_finish(workdir)
      interrupted = False
    except KeyboardInterrupt:
      interrupted = True
    fail_at[0], seen = None, list(calls)
    assert snapshot(os.path.join(workdir, "checkpoints")) == old or _steps(workdir) == [9], (
        k, calls)
    with workdir_lib.locked(workdir, "train"):  # the next checkpoint writer finishes it
      pass
    assert _steps(workdir) == [9], (k, calls)
    assert snapshot(os.path.join(workdir, checkpoints.SET_ASIDE_DIR,
                                 "checkpoints.before_import")) == old
    assert json.load(open(os.path.join(workdir, "imported_from.json")))["step"] == 9
    assert not any(n.startswith((".import-", workdir_lib.IMPORT_MARKER))
                   for n in os.listdir(workdir))
    if not interrupted:  # k is past the last operation
      break
    k += 1
  assert len(seen) == k >= 5 and seen[0] == "exchange", seen  # each operation interrupted
  monkeypatch.undo()
  assert programs.restore_run(tiny_config(), workdir).step == 9


def test_export_refuses_an_existing_output_before_work(run_dir, tmp_path):
  out = tmp_path / "theirs.pth"
  out.write_bytes(b"a user's file")
  with pytest.raises(FileExistsError, match=r"theirs\.pth already exists; pass --overwrite"):
    rc.export_checkpoint(tiny_config(), run_dir[0], out)
  assert out.read_bytes() == b"a user's file"
  assert rc.export_checkpoint(tiny_config(), run_dir[0], out, overwrite=True) == 4
  assert sorted(torch_zip.load(out)) == ["ema", "model", "optimizer", "step"]
  assert os.listdir(tmp_path) == ["theirs.pth"]


def test_import_and_export_killed_at_random_moments(run_dir, tmp_path):
  """SIGKILL / SIGINT / SIGTERM at a random moment of `scripts/import_checkpoint.py
  --overwrite` and of `scripts/export_checkpoint.py --overwrite`: the old state or the new
  one, never neither; the next holder of the lock finishes a pending import."""
  rng = random.Random(27)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  config_flags = ["--config=" + os.path.join(REPO, "configs", "fashion_mnist_vp.py") + ":tiny",
                  *__import__("test_train").cli_flags()]
  workdir = copy_run(run_dir, tmp_path)
  old = snapshot(os.path.join(workdir, "checkpoints"))
  out = tmp_path / "old.pth"
  out.write_bytes(b"old export")
  jobs = [("import", [sys.executable, os.path.join(REPO, "scripts", "import_checkpoint.py"),
                      *config_flags, f"--checkpoint={run_dir[1]}", f"--workdir={workdir}",
                      "--overwrite"]),
          ("export", [sys.executable, os.path.join(REPO, "scripts", "export_checkpoint.py"),
                      *config_flags, f"--workdir={run_dir[0]}", f"--output={out}",
                      "--overwrite"])]
  procs = [(kind, subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)) for kind, cmd in jobs]
  # Both start together; each is killed at a random moment of its work (JAX's import takes
  # most of the first seconds, so the moments are drawn once the workdir is locked).
  deadline = time.time() + 120
  while time.time() < deadline and procs[0][1].poll() is None and not os.path.exists(
      os.path.join(workdir, workdir_lib.LOCK_FILE)):
    time.sleep(0.01)
  for (kind, proc), sig in zip(procs, rng.sample([signal.SIGKILL, signal.SIGINT,
                                                  signal.SIGTERM], 2)):
    time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(sig)
  for _, proc in procs:
    proc.wait(timeout=120)
  assert snapshot(os.path.join(workdir, "checkpoints")) == old or _steps(workdir) == [9]
  assert out.read_bytes() == b"old export" or sorted(torch_zip.load(out)) == [
      "ema", "model", "optimizer", "step"]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".old.pth.tmp")]
  with workdir_lib.locked(workdir, "test"):
    pass
  steps = _steps(workdir)
  assert steps in ([2, 4], [9]), steps
  assert programs.restore_run(tiny_config(), workdir).step == steps[-1]


def _complete(path):
  """Whether an output file is whole: an .npz whose arrays load, a PNG PIL decodes, a JSON
  object."""
  if path.endswith(".npz"):
    with np.load(path) as f:
      return all(f[k].size >= 0 for k in f.files) and bool(f.files)
  if path.endswith(".png"):
    from PIL import Image
    with Image.open(path) as image:
      image.load()
    return True
  if path.endswith(".json"):
    return isinstance(json.load(open(path)), dict)
  return False


def test_eval_and_sample_killed_at_random_moments(trained, tmp_path):
  """`--mode=eval` and `--mode=sample` on a copy of the trained tiny run, started together
  and each sent SIGKILL, SIGINT or SIGTERM at a random moment once it holds its lock: every
  file that was there is byte-identical, every new output is complete (temporary files are
  hidden `.<name>.tmp-*`), and the next run takes the locks over."""
  rng = random.Random(2705)
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir,
                  ignore=shutil.ignore_patterns("lock*.json", "samples", "eval"))
  before = snapshot(workdir)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  base = [sys.executable, "-m", "score_sde.main",
          "--config=" + os.path.join(REPO, "configs", "fashion_mnist_vp.py") + ":tiny",
          f"--workdir={workdir}"]
  jobs = {"sample": [*base, "--mode=sample", "--num_samples=4",
                     "--config.sampling.method=ddim", "--config.sampling.steps=4"],
          "eval": [*base, "--mode=eval"]}
  procs = {mode: subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for mode, cmd in jobs.items()}
  deadline = time.time() + 120
  for mode, proc in procs.items():  # the moments are drawn once each holds its lock
    lock = os.path.join(workdir, workdir_lib.lock_file(mode))
    while time.time() < deadline and proc.poll() is None and not os.path.exists(lock):
      time.sleep(0.01)
  signals = {}
  for mode in rng.sample(sorted(procs), 2):
    time.sleep(rng.uniform(0.0, 2.0))
    signals[mode] = rng.choice([signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
    procs[mode].send_signal(signals[mode])
  for proc in procs.values():
    proc.wait(timeout=120)
  after = snapshot(workdir)
  assert {k: after.get(k) for k in before} == before, signals
  new = [k for k in after if k not in before]
  outputs = [k for k in new if not os.path.basename(k).startswith(".")]
  assert all(".tmp-" in os.path.basename(k) for k in new if k not in outputs), new
  assert all(k.startswith(("samples/", "eval/", "lock")) for k in outputs), outputs
  for k in outputs:
    if not k.startswith("lock"):
      assert _complete(os.path.join(workdir, k)), k
  for mode in procs:
    with workdir_lib.locked(workdir, mode):
      pass


# ----------------------------------------------------------------------------------------
# A failed background save.


def test_failed_background_save_stops_training_with_status_4(tmp_path, monkeypatch, capsys):
  """The save of step 4 fails in orbax's background thread with ENOSPC: training stops at the
  next step with exit status 4 and one line naming the directory and the error; checkpoint
  2 is untouched and still restores."""
  from orbax.checkpoint._src.path import async_path
  real, calls = async_path.rename, []

  async def rename(source, target, *args, **kwargs):
    calls.append(str(target))
    if "/4" in str(target):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    return await real(source, target, *args, **kwargs)

  monkeypatch.setattr(async_path, "rename", rename)
  workdir = str(tmp_path / "run")
  # No snapshot samples, and the test loss only at step 6 (never reached): one compilation.
  config = tiny_config(**{"training.snapshot_sampling": False, "training.eval_freq": 6})
  assert main_lib.execute(config, workdir, "train") == 4
  err = capsys.readouterr().err.strip().splitlines()
  line = err[-1]
  assert line.startswith(f"error: Saving a checkpoint into {workdir}/checkpoints failed: "
                         f"[Errno 28] No space left on device"), line
  assert "Last intact checkpoint: step 2 (untouched)" in line, line
  assert _steps(workdir) == [2]
  assert programs.restore_run(config, workdir).step == 2
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


def test_failed_save_stops_autoencoder_training_with_status_4(tmp_path, monkeypatch, capsys):
  """train_autoencoder shares the score model's save checks (`programs.train_loop`): the last
  save (step 2) fails with ENOSPC in the background -> exit 4 and one line; step 1 is intact.
  The update is a stand-in that only counts steps, so nothing but the init compiles."""
  from orbax.checkpoint._src.path import async_path
  from score_sde.run import autoencoder_training
  from test_latent import tiny_config as ae_config
  real = async_path.rename

  async def rename(source, target, *args, **kwargs):
    if str(target).endswith("/2"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    return await real(source, target, *args, **kwargs)

  monkeypatch.setattr(async_path, "rename", rename)
  monkeypatch.setattr(autoencoder_training, "make_train_step", lambda spec, mesh=None: (
      lambda state, key, images: (state.replace(step=state.step + 1),
                                  {"loss": jnp.zeros(())})))
  monkeypatch.setattr(autoencoder_training, "test_psnr",
                      lambda *args: (30.0, np.zeros((1, 16, 16, 1)), np.zeros((1, 16, 16, 1))))
  workdir = str(tmp_path / "run")
  config = ae_config(n_iters=2, snapshot_freq=1, log_freq=1, eval_freq=100)
  assert main_lib.execute(config, workdir, "train_autoencoder") == 4
  line = capsys.readouterr().err.strip().splitlines()[-1]
  directory = os.path.join(workdir, "autoencoder")
  assert line.startswith(f"error: Saving a checkpoint into {directory}/checkpoints failed: "
                         f"[Errno 28] No space left on device"), line
  assert "Last intact checkpoint: step 1 (untouched)" in line, line
  assert _steps(directory) == [1]


# ----------------------------------------------------------------------------------------
# Files read, checked before work.


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "holds a JSON list, not an object of config sections"),
    ('{"model": null, "seed": 0}', "section(s) ['model'] are null"),
])
def test_config_json_not_an_object_or_with_null_sections(run_dir, tmp_path, capsys, text,
                                                         message):
  workdir = copy_run(run_dir, tmp_path)
  open(os.path.join(workdir, "config.json"), "w").write(text)
  before = snapshot(workdir)
  for mode in ("sample", "train"):
    status, line, compiles = execute(capsys, tiny_config(), workdir, mode)
    assert status == 2 and compiles == 0, line
    assert line.startswith(f"error: {workdir}/config.json") and message in line, line
  assert snapshot(workdir) == before


def _idx(path, array, gz=False):
  import gzip
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(n).to_bytes(4, "big") for n in array.shape)
  data = header + array.astype(np.uint8).tobytes()
  open(path, "wb").write(gzip.compress(data) if gz else data)


def test_idx_files_of_another_size_or_cut_short(tmp_path, capsys):
  from score_sde.io import datasets
  for split, prefix in (("train", "train"), ("test", "t10k")):
    _idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.zeros((4, 32, 32)))
    _idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.zeros((4,)))
  config = tiny_config(**{"data.dataset": "fashion_mnist", "data.data_dir": str(tmp_path),
                          "data.image_size": 28})
  before = snapshot(str(tmp_path))
  status, line, compiles = execute(capsys, config, str(tmp_path / "run"), "train")
  assert status == 2 and compiles == 0, line
  assert ("config.data.image_size=28 but the 'fashion_mnist' train images in "
          f"{tmp_path} are 32x32") in line, line
  assert snapshot(str(tmp_path)) == before
  cut = tmp_path / "cut.gz"
  _idx(cut, np.zeros((4, 28, 28)), gz=True)
  cut.write_bytes(cut.read_bytes()[:-20])
  with pytest.raises(ValueError, match=r"cut\.gz: gzip data cut short or corrupt"):
    datasets.read_idx(cut, ndim=3)


def test_sampling_batch_is_capped_to_the_samples_asked_for():
  from score_sde.io import parallel
  from score_sde.run import evaluate
  mesh = parallel.make_mesh()
  config = tiny_config(**{"sampling.batch_size": 200_000})
  assert int(evaluate._capped_batch(config, 1, mesh).sampling.batch_size) == 2  # 2 devices
  assert int(evaluate._capped_batch(config, 5, mesh).sampling.batch_size) == 6
  assert int(config.sampling.batch_size) == 200_000  # the given config is unchanged
  small = tiny_config(**{"sampling.batch_size": 4})
  assert evaluate._capped_batch(small, 64, mesh) is small


def test_imported_weights_that_are_not_finite_are_refused(run_dir, tmp_path):
  obj = torch_zip.load(run_dir[1])
  name = sorted(k for k, v in obj["model"].items() if v.dtype == np.float32 and v.ndim > 1)[0]
  obj["model"][name] = obj["model"][name].copy()
  obj["model"][name].flat[0] = np.nan
  bad = tmp_path / "nan.pth"
  torch_zip.save(obj, bad)
  with pytest.raises(ValueError, match=rf"model entry {name.removeprefix('module.')} holds 1 non-finite value"):
    rc.import_checkpoint(tiny_config(), bad, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
