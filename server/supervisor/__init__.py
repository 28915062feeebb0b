"""The `flux-server` command line and `flux-server serve`'s supervisor (imports no torch).

    cli.py          the command line: serve | api | worker | health | generate | migrate-queue | make-cert
    serve.py        `flux-server serve`: start-up checks, then the supervisor's run loop
    preflight.py    serve's start-up checks and banner
    gpus.py         which GPU each worker gets (CUDA_VISIBLE_DEVICES as given, else 0..n-1)
    children.py     one supervised child process, and when it is started again after it exits
    queue_writes.py what the supervisor tells the queue (releases, worker rows), kept until it succeeds
    loop.py         the run loop: start, reap, restart, stop
    generate.py     `flux-server generate` (the one module here that loads a model)

Nothing here is imported by the API or the worker: they are the programs this package starts.
"""
