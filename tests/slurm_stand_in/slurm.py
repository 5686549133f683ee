"""A stand-in for Slurm on one machine, so that submitit's real Slurm path runs in the tests:
`sbatch`, `srun`, `sacct`, `squeue`, `scancel` and `scontrol requeue`, each a small executable
in bin/ that calls this file. A job runs as local processes, in a session of its own; job
arrays keep their `%` limit. The jobs' states live in SLURM_STAND_IN_DIR.

States as Slurm names them: PENDING, RUNNING, then COMPLETED, FAILED (a non-zero exit),
NODE_FAIL (killed by SIGKILL: a lost node), or CANCELLED (scancel: SIGTERM to every process
of the job, SIGKILL 20 s later). `scontrol requeue` puts a job back to PENDING once its
processes have ended; `scancel --signal=USR2` signals them, as Slurm does before a time limit.
"""

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time

import filelock

STATE = os.environ.get("SLURM_STAND_IN_DIR", "/tmp/slurm-stand-in")
FINAL = ("COMPLETED", "FAILED", "NODE_FAIL", "CANCELLED")
KILL_WAIT = 20  # seconds between scancel's SIGTERM and its SIGKILL, as Slurm's KillWait


def jobs():
    """`{job id: state}` of every job, under a lock: the supervisor and the commands share it."""
    path = os.path.join(STATE, "jobs.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def locked():
    os.makedirs(STATE, exist_ok=True)
    return filelock.FileLock(os.path.join(STATE, "jobs.lock"))


def save(table):
    path = os.path.join(STATE, "jobs.json")
    with open(path + ".tmp", "w") as file:
        json.dump(table, file)
    os.replace(path + ".tmp", path)


def update(job_id, **values):
    with locked():
        table = jobs()
        table[job_id].update(values)
        save(table)


def elements(table, ids):
    """The job ids in `table` that `ids` name: a job, an array (all its elements), an element."""
    return [job for job in table for wanted in ids
            if job == wanted or job.split("_")[0] == wanted]


def sbatch(script):
    text = open(script).read()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    if options.get("partition") == "nope":
        sys.exit("sbatch: error: invalid partition specified: nope")
    with locked():
        table = jobs()
        job = str(1000 + len({name.split("_")[0] for name in table}))
        if "array" in options:
            last, _, limit = options["array"].removeprefix("0-").partition("%")
            names = [f"{job}_{index}" for index in range(int(last) + 1)]
        else:
            names, limit = [job], "1"
        for name in names:
            table[name] = {"state": "PENDING", "script": os.path.abspath(script),
                           "limit": int(limit or len(names)), "cwd": os.getcwd()}
        save(table)
    subprocess.Popen([sys.executable, __file__, "supervise", job], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job}")


def supervise(job):
    """Runs a submission's jobs, the array's limit at a time, until every one has ended. As
    the subreaper of their processes, it sees when the last one of a job is gone."""
    ctypes.CDLL("libc.so.6").prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    codes = {}  # the exit status of each job's script, by its process id
    while True:
        with contextlib.suppress(ChildProcessError):
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    break
                codes[pid] = os.waitstatus_to_exitcode(status)
        table = jobs()
        mine = {name: values for name, values in table.items() if name.split("_")[0] == job}
        running = [name for name, values in mine.items() if values["state"] == "RUNNING"]
        for name in running:
            values = mine[name]
            if alive(values["pid"]):
                if values.get("cancelled_at") and time.time() - values["cancelled_at"] > KILL_WAIT:
                    kill(values["pid"], signal.SIGKILL)
                continue
            if values.get("requeue"):
                update(name, state="PENDING", requeue=False, requeued=values.get("requeued", 0) + 1)
            elif values.get("cancelled_at"):
                update(name, state="CANCELLED")
            else:
                code = codes.get(values["pid"], 0)
                update(name, state="COMPLETED" if code == 0 else
                       "NODE_FAIL" if code == -signal.SIGKILL else "FAILED")
        table = jobs()
        mine = {name: values for name, values in table.items() if name.split("_")[0] == job}
        busy = sum(values["state"] == "RUNNING" for values in mine.values())
        for name, values in sorted(mine.items()):
            if values["state"] == "PENDING" and busy < values["limit"]:
                update(name, state="RUNNING", pid=start(name, values), started_at=time.time())
                busy += 1
        if all(values["state"] in FINAL for values in mine.values()):
            return
        time.sleep(0.2)


def start(name, values):
    array, _, index = name.partition("_")
    environment = {**os.environ, "SLURM_JOB_ID": str(int(array) * 1000 + int(index or 0)),
                   "SLURM_JOB_NAME": "stand-in", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                   "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1",
                   "SLURM_JOB_NODELIST": "localhost", "SLURM_STAND_IN_JOB": name}
    if index:
        environment.update(SLURM_ARRAY_JOB_ID=array, SLURM_ARRAY_TASK_ID=index)
    else:
        environment["SLURM_JOB_ID"] = array
    pid = os.fork()  # not subprocess: it would reap the script itself, and its exit status
    if pid == 0:
        os.setsid()
        os.chdir(values["cwd"])
        null = os.open(os.devnull, os.O_RDWR)
        for descriptor in (0, 1, 2):
            os.dup2(null, descriptor)
        os.execvpe("bash", ["bash", values["script"]], environment)
    return pid


def alive(pid):
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill(pid, number):
    try:
        os.killpg(pid, number)
    except ProcessLookupError:
        pass


def srun(arguments):
    """Runs the command with its output in the files --output and --error name."""
    files = {}
    while arguments[0].startswith("--"):
        option = arguments.pop(0)
        if option in ("--output", "--error"):
            files[option] = arguments.pop(0)
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    for option, path in files.items():
        path = path.replace("%A", array or "").replace("%a", index or "").replace(
            "%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(descriptor, 1 if option == "--output" else 2)
    os.execvp(arguments[0], arguments)


def sacct(arguments):
    ids = [arguments[i + 1] for i, argument in enumerate(arguments) if argument == "-j"]
    table = jobs()
    print("JobID|State|NodeList")
    for name in elements(table, ids):
        print(f"{name}|{table[name]['state']}|localhost")


def squeue(arguments):
    table = jobs()
    print("JOBID STATE")
    for name, values in table.items():
        if values["state"] not in FINAL:
            print(f"{name} {values['state']}")


def scancel(arguments):
    wanted = [argument for argument in arguments if not argument.startswith("-")]
    number = next((argument.split("=")[1] for argument in arguments
                   if argument.startswith("--signal=")), None)
    if "--signal" in arguments:
        number = arguments[arguments.index("--signal") + 1]
        wanted.remove(number)
    with locked():
        table = jobs()
        for name in elements(table, wanted):
            values = table[name]
            if number:
                if values["state"] == "RUNNING":
                    kill(values["pid"], getattr(signal, "SIG" + number.removeprefix("SIG")))
            elif values["state"] == "PENDING":
                values["state"] = "CANCELLED"
            elif values["state"] == "RUNNING" and not values.get("cancelled_at"):
                values["cancelled_at"] = time.time()
                kill(values["pid"], signal.SIGTERM)
        save(table)


def scontrol(arguments):
    if arguments[0] != "requeue":
        sys.exit(f"scontrol {arguments[0]}: not in the stand-in")
    for name in elements(jobs(), arguments[1:]):
        update(name, requeue=True)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"sbatch": lambda: sbatch(rest[-1]), "srun": lambda: srun(rest),
     "sacct": lambda: sacct(rest), "squeue": lambda: squeue(rest),
     "scancel": lambda: scancel(rest), "scontrol": lambda: scontrol(rest),
     "supervise": lambda: supervise(rest[0])}[command]()
