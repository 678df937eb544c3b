"""Pretrain a nanochat GPT: compose the Hydra config, validate it, build every component, train.

python train.py                                   # tiny model on Shakespeare, CPU, minutes
python train.py model=d12 optimizer=adamw_muon    # nanochat's d12 and optimizer recipe
python train.py -m optimizer.lr=1e-4,3e-4         # a sweep: one run dir and W&B run per job
python train.py hydra.run.dir=<run dir>           # continue that run from its newest checkpoint
torchrun --standalone --nproc_per_node=8 train.py experiment=d20_speedrun   # 8 GPUs, one run dir

Every job of the command line is checked before Hydra makes a run dir (nanochat/assemble.py,
preflight); nanochat/assemble.py builds the run, nanochat/trainer.py trains it.
"""

import sys
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nanochat.assemble import assemble, check_jobs
from nanochat.config import (
    as_user_error,
    discard_if_untouched,
    hydra_run_dir,
    is_sweep_job,
    job_name,
    sweep_group,
    task_overrides,
)
from nanochat.distributed import RankFailed, is_main, lost_peer, report, run_as_rank, world_size


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        final = assemble(cfg, hydra_run_dir(), task_overrides(), sweep_group(), job_name()).fit()
        if "stopped_by" in final:  # also ends a sweep: the user or the scheduler asked to stop
            sys.exit(0)
        return final["val/bpb"]  # the run said "done in ..." in its train.log
    except Exception as error:
        user_error = as_user_error(error)
        if user_error is not None:
            if is_main() or not isinstance(user_error, RankFailed):  # rank 0 reports the others' failures
                report(str(user_error))
            if is_main():
                discard_if_untouched(hydra_run_dir())
            if not is_sweep_job():
                sys.exit(2)
        elif lost_peer(error):
            report(
                f"lost contact with another rank ({str(error).splitlines()[0]}); that rank's own error is above, "
                "and torchrun's summary names it."
            )
            sys.exit(1)
        elif not is_sweep_job():
            raise
        else:
            traceback.print_exc()
    # Only a sweep job gets here: one failed job must not end the sweep.
    print(f"sweep job {HydraConfig.get().job.num} failed ({hydra_run_dir()}); continuing", file=sys.stderr)
    return float("nan")


if __name__ == "__main__":
    # The process group is joined before Hydra, so that every rank can take rank 0's run dir; every
    # mistake, for every job, is found before any run dir exists.
    run_as_rank(main, preflight=lambda: check_jobs(sys.argv[1:], world_size()))
