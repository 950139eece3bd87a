#!/usr/bin/env bash
# lmjax on a Cloud TPU VM slice: create it, install lmjax on every worker, run, follow, stop, delete.
# Every worker of a multi-host slice runs the same `lmjax train` command; jax.distributed finds its
# peers from the TPU metadata (distributed.initialize=auto), so nothing here names hosts or ranks.
# --dry-run prints the commands, one a line, and runs nothing (no gcloud needed).
# Written for bash 3.2 too (macOS): no associative arrays, empty arrays expanded with ${a[@]+...}.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [options] [--config.KEY=VALUE ...] [-- LMJAX_TRAIN_FLAGS ...]

Commands:
  create   create the TPU VM slice (--queued: a queued resource, which waits for capacity)
  status   describe the TPU VM (or queued resource): state, workers' IPs
  setup    copy this checkout to every worker (or git clone --repo) and install lmjax + jax[tpu]
  run      start `lmjax train` on every worker in the background, logging to ~/lmjax-RUN.log
  sweep    the same for `lmjax sweep` (--config is a sweep config, e.g. configs/sweeps/pod.py): the
           sweep's points train one after another, each on the whole slice
  logs     follow the log of one worker (worker 0 unless --worker=N)
  stop     SIGTERM `lmjax train` (or `lmjax sweep`) on every worker: all save a checkpoint at the
           same step and exit; waits until they have. Rerun `run` (`sweep`) with the same flags
           to resume.
  delete   delete the TPU VM (or queued resource, with its VM)

Options (flag, or the environment variable in brackets):
  --name NAME          TPU VM / queued resource name               [LMJAX_TPU_NAME]   required
  --zone ZONE          e.g. us-east5-a                              [LMJAX_ZONE]       required
  --project PROJECT    default: gcloud's configured project         [LMJAX_PROJECT]
  --type TYPE          accelerator type, e.g. v5p-32 (create)       [LMJAX_TPU_TYPE]
  --version VERSION    TPU runtime (create); default from --type:   [LMJAX_TPU_VERSION]
                       v5p: v2-alpha-tpuv5, v5e (v5litepod): v2-alpha-tpuv5-lite,
                       v6e: v2-alpha-tpuv6e, v4 and older: tpu-ubuntu2204-base
  --spot               create a Spot TPU (cheaper, can be preempted at any time)
  --preemptible        create a preemptible TPU (older TPU types; not with --queued)
  --queued             create/status/delete a queued resource named NAME (node id NAME too)
  --repo URL           setup: git clone URL on the workers instead of copying this checkout
  --ref REF            setup with --repo: branch, tag or commit to check out (default: HEAD)
  --python VERSION     setup: Python of the workers' venv ~/lmjax-venv (default 3.12)
  --config FILE[:VAR]  run: config, a path inside the repo, e.g. configs/llama.py:1b [LMJAX_CONFIG]
  --run RUN            run/logs: run name, used for the log file and the default workdir
                       (default from --config: configs/llama.py:1b -> llama-1b)  [LMJAX_RUN]
  --bucket BUCKET      run: workdir = gs://BUCKET/runs/RUN (sweep: gs://BUCKET/sweeps/RUN)
                                                                          [LMJAX_BUCKET]
  --workdir DIR        run: the workdir itself, e.g. gs://BUCKET/runs/x (wins over --bucket)
  --worker N           logs: which worker's log (default 0)
  --yes                delete without gcloud's confirmation prompt
  --dry-run            print the commands, run nothing
  -h, --help           this help

Any --config.KEY=VALUE argument, and everything after --, is passed to `lmjax train` (or
`lmjax sweep`) as is.

Example (v5p-32: 4 workers, 16 chips, 16 JAX devices):
  launch/tpu.sh create --name=lm --zone=us-east5-a --type=v5p-32 --spot
  launch/tpu.sh setup  --name=lm --zone=us-east5-a
  launch/tpu.sh run    --name=lm --zone=us-east5-a --bucket=my-bucket --config=configs/llama.py:1b
  launch/tpu.sh logs   --name=lm --zone=us-east5-a --config=configs/llama.py:1b
  launch/tpu.sh stop   --name=lm --zone=us-east5-a
  launch/tpu.sh delete --name=lm --zone=us-east5-a
EOF
}

die() {
  echo "tpu.sh: $*" >&2
  echo "Run 'launch/tpu.sh --help' for usage." >&2
  exit 2
}

# Prints its arguments as one shell command line that a shell reads back as the same words:
# plain words bare, others single-quoted; `--flag=VALUE` keeps the flag outside the quotes.
quote() {
  local out="" arg flag sq="'" escaped="'\\''"
  for arg in "$@"; do
    flag=""
    if [[ $arg =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      flag=${BASH_REMATCH[1]}
      arg=${BASH_REMATCH[2]}
    fi
    if [[ ! $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      arg="'${arg//$sq/$escaped}'"
    fi
    out+="${out:+ }$flag$arg"
  done
  printf '%s\n' "$out"
}

# Runs a command, or only prints it with --dry-run. Real runs echo it to stderr first.
execute() {
  if ((dry_run)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# ---- options ---------------------------------------------------------------------------------
command=""
name=${LMJAX_TPU_NAME:-}
zone=${LMJAX_ZONE:-}
project=${LMJAX_PROJECT:-}
tpu_type=${LMJAX_TPU_TYPE:-}
version=${LMJAX_TPU_VERSION:-}
config=${LMJAX_CONFIG:-}
run_name=${LMJAX_RUN:-}
bucket=${LMJAX_BUCKET:-}
workdir=""
repo_url=""
ref="HEAD"
python_version="3.12"
worker="0"
capacity=""  # "", --spot or --preemptible
queued=0
yes=0
dry_run=0
train_args=()  # passed through to `lmjax train`

while (($#)); do
  arg=$1
  shift
  case $arg in
    --config.*) train_args+=("$arg"); continue ;;
    --) train_args+=("$@"); break ;;
    --*=*) opt=${arg%%=*}; value=${arg#*=}; has_value=1 ;;
    *) opt=$arg; value=""; has_value=0 ;;
  esac
  case $opt in
    -h | --help) usage; exit 0 ;;
    --dry-run | --spot | --preemptible | --queued | --yes)
      ((!has_value)) || die "$opt takes no value"
      case $opt in
        --dry-run) dry_run=1 ;;
        --queued) queued=1 ;;
        --yes) yes=1 ;;
        *) [[ -z $capacity || $capacity == "$opt" ]] || die "choose one of --spot and --preemptible"
           capacity=$opt ;;
      esac
      ;;
    --name | --zone | --project | --type | --version | --config | --run | --bucket | --workdir | \
    --repo | --ref | --python | --worker)
      if ((!has_value)); then
        (($#)) || die "$opt needs a value"
        value=$1
        shift
      fi
      case $opt in
        --name) name=$value ;;
        --zone) zone=$value ;;
        --project) project=$value ;;
        --type) tpu_type=$value ;;
        --version) version=$value ;;
        --config) config=$value ;;
        --run) run_name=$value ;;
        --bucket) bucket=${value#gs://} ;;
        --workdir) workdir=$value ;;
        --repo) repo_url=$value ;;
        --ref) ref=$value ;;
        --python) python_version=$value ;;
        --worker) worker=$value ;;
      esac
      ;;
    -*) die "unknown option '$arg'" ;;
    *) [[ -z $command ]] || die "one command at a time (got '$command' and '$arg')"
       command=$arg ;;
  esac
done

[[ -n $command ]] || die "missing COMMAND: create, status, setup, run, sweep, logs, stop or delete"
case $command in
  create | status | setup | run | sweep | logs | stop | delete) ;;
  *) die "unknown command '$command'" ;;
esac
[[ -n $name ]] || die "$command needs --name (or LMJAX_TPU_NAME)"
[[ -n $zone ]] || die "$command needs --zone (or LMJAX_ZONE)"
if ((!dry_run)) && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
fi

# Flags every gcloud call takes; the project only when given (else gcloud's configured one).
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")

ssh_all() {  # ssh_all REMOTE_COMMAND: run a shell command on every worker at once
  execute gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

# The run name picks the log file (and the default workdir): configs/llama.py:1b -> llama-1b.
derive_run_name() {
  if [[ -z $run_name && -n $config ]]; then
    local base=${config##*/} variant=""
    [[ $base != *:* ]] || variant=${base#*:}
    base=${base%%:*}
    base=${base%.py}
    run_name=$base${variant:+-$variant}
  fi
  run_name=${run_name//[!A-Za-z0-9._-]/-}  # the name goes into remote paths unquoted
}

# ---- commands --------------------------------------------------------------------------------
# Paths on the workers, left unquoted in the remote commands so that the worker's shell expands ~.
# shellcheck disable=SC2088
venv='~/lmjax-venv' uv='~/.local/bin/uv'

case $command in
  create)
    [[ -n $tpu_type ]] || die "create needs --type, e.g. --type=v5p-32 (or LMJAX_TPU_TYPE)"
    if [[ -z $version ]]; then
      case $tpu_type in
        v6e-*) version=v2-alpha-tpuv6e ;;
        v5p-*) version=v2-alpha-tpuv5 ;;
        v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
        v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
        *) die "no default runtime for --type=$tpu_type: pass --version (see 'gcloud compute tpus tpu-vm versions list --zone=$zone')" ;;
      esac
    fi
    if ((queued)); then
      [[ $capacity != --preemptible ]] || die "queued resources take --spot, not --preemptible"
      # The queued resource waits for capacity, then creates the node NAME; `status` shows when
      # it is ACTIVE.
      execute gcloud compute tpus queued-resources create "$name" "${where[@]}" --node-id="$name" \
        --accelerator-type="$tpu_type" --runtime-version="$version" ${capacity:+"$capacity"}
    else
      execute gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
        --accelerator-type="$tpu_type" --version="$version" ${capacity:+"$capacity"}
    fi
    ;;

  status)
    if ((queued)); then
      execute gcloud compute tpus queued-resources describe "$name" "${where[@]}"
    else
      execute gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
    fi
    ;;

  setup)
    if [[ -n $repo_url ]]; then
      # Clone once, then fetch: rerunning setup updates the code and keeps anything else there.
      get_code="{ test -d ~/lmjax/.git || git clone $(quote "$repo_url") ~/lmjax; }"
      get_code+=" && cd ~/lmjax && git fetch origin $(quote "$ref") && git checkout --force FETCH_HEAD"
    else
      # Copy the files git would commit (tracked + untracked, not ignored): leaves out .venv,
      # runs/ and other large local files. The tarball is unpacked over ~/lmjax.
      repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
      tarball=/tmp/lmjax-$name.tar.gz
      export COPYFILE_DISABLE=1  # macOS tar: no ._ resource-fork files in the archive
      if ((dry_run)); then
        echo "$(quote git -C "$repo" ls-files -z --cached --others --exclude-standard)" \
          "| $(quote tar -czf "$tarball" -C "$repo" --null -T -)"
      else
        echo "+ packing $repo into $tarball" >&2
        git -C "$repo" ls-files -z --cached --others --exclude-standard |
          tar -czf "$tarball" -C "$repo" --null -T -
      fi
      execute gcloud compute tpus tpu-vm scp "$tarball" "$name:lmjax.tar.gz" "${where[@]}" --worker=all
      get_code="mkdir -p ~/lmjax && tar -xzf ~/lmjax.tar.gz -C ~/lmjax && cd ~/lmjax"
    fi
    # The runtime images' system Python is older than current JAX supports, so uv (from PyPI)
    # makes a venv with its own Python; `pip install -e . jax[tpu]` runs in it. libtpu comes from
    # PyPI with jax[tpu]; the -f index is JAX's documented fallback for older releases.
    # (--break-system-packages: the retry for images whose Python refuses user installs, PEP 668)
    install="{ python3 -m pip install --user --upgrade uv"
    install+=" || python3 -m pip install --user --upgrade --break-system-packages uv; }"
    install+=" && $uv venv --allow-existing --python $(quote "$python_version") $venv"
    install+=" && $uv pip install --python $venv/bin/python -e '.[gcs]' 'jax[tpu]'"
    install+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ssh_all "$get_code && $install"
    # Every worker must see the whole slice (v5p-32: 16 devices, 4 of them local).
    ssh_all "$venv/bin/python -c 'import jax; print(jax.device_count(), \"devices,\", jax.local_device_count(), \"local\")'"
    ;;

  run | sweep)
    # run: `lmjax train`; sweep: `lmjax sweep` (a scaling sweep's points, one after another)
    subcommand=train runs=runs example=configs/llama.py:1b
    [[ $command == run ]] || subcommand=sweep runs=sweeps example=configs/sweeps/pod.py
    [[ -n $config ]] || die "$command needs --config, e.g. --config=$example (or LMJAX_CONFIG)"
    derive_run_name
    if [[ -z $workdir ]]; then
      [[ -n $bucket ]] || die "$command needs --bucket=BUCKET (workdir gs://BUCKET/$runs/RUN) or --workdir=DIR"
      workdir=gs://$bucket/$runs/$run_name
    fi
    train=$(quote "$subcommand" --config="$config" --workdir="$workdir" --no_progress \
      ${train_args[@]+"${train_args[@]}"})
    # nohup + redirects: the ssh session returns at once and the run outlives it. The log is
    # appended to, so a resumed run keeps the earlier output. Unbuffered: the log is live.
    ssh_all "cd ~/lmjax || exit 1; PYTHONUNBUFFERED=1 nohup $venv/bin/lmjax $train >> ~/lmjax-$run_name.log 2>&1 < /dev/null &"
    ((dry_run)) || echo "Started $command '$run_name' (workdir $workdir) on every worker." \
      "Follow it: launch/tpu.sh logs --name=$name --zone=$zone --run=$run_name" >&2
    ;;

  logs)
    derive_run_name
    # shellcheck disable=SC2088,SC2016  # ~ and $(...) are for the worker's shell
    if [[ -n $run_name ]]; then
      log="~/lmjax-$run_name.log"
    else
      log='"$(ls -t ~/lmjax-*.log | head -n 1)"'  # the newest run's log
    fi
    execute gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$worker" \
      --command="tail -n 100 -F $log"
    ;;

  stop)
    # The pattern [l]mjax does not match this command's own shell, whose command line holds
    # "[l]mjax (train|sweep)" (and must hold the plain words nowhere). lmjax passes one host's stop
    # request to all, so every host saves the same step (a sweep stops after its current point's
    # checkpoint). Waiting for the exit means the checkpoint is written when this returns.
    ssh_all "pkill -TERM -f '[l]mjax (train|sweep)' || true; while pgrep -f '[l]mjax (train|sweep)' > /dev/null; do sleep 1; done; echo \"\$(hostname): stopped\""
    ;;

  delete)
    confirm=()
    ((!yes)) || confirm=(--quiet)
    if ((queued)); then
      # --force deletes the queued resource's TPU VM too.
      execute gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force \
        ${confirm[@]+"${confirm[@]}"}
    else
      execute gcloud compute tpus tpu-vm delete "$name" "${where[@]}" ${confirm[@]+"${confirm[@]}"}
    fi
    ;;
esac
