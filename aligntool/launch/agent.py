"""torchrun, with aligntool's reports: ``python -m aligntool.launch.agent TORCHRUN_ARGS`` runs torch.distributed.run's
own launch (its elastic agent, rendezvous and process handling, unchanged), but a failed rank ends it with that rank's
exit code instead of torchrun's ChildFailedError report (a launcher traceback and a box naming the rank, after the
rank has already said what went wrong: aligntool's one line, or its own traceback). A rank ended by a signal, which
says nothing itself, is named in one line."""

from __future__ import annotations

import logging
import sys

# torch.distributed.elastic's per-module loggers whose lines repeat what a rank said ("failed (exitcode: 69) ...",
# "Sending process ... closing signal SIGTERM") or that a finished run need not hear
QUIET = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api",
         "torch.distributed.elastic.agent.server.local_elastic_agent", "torch.distributed.run")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        print(f"aligntool: error: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) was ended by "
              f"{failure.signal_name()}", file=sys.stderr, flush=True)
        return 128 - failure.exitcode if failure.exitcode < 0 else 1
    except SignalException as exc:  # the launcher itself was signalled (Ctrl-C): the ranks were stopped
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
