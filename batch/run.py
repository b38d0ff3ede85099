"""`python -m batch.run`: the command cron and Task Scheduler start.

The launcher is imported only when this module runs as the program: worker processes,
started with "spawn", import this module again under another name and need none of it.
"""

if __name__ == "__main__":
    import sys

    from batch.launcher import main

    sys.exit(main())
