"""What the tests share; importable as ``support`` because pytest puts ``tests/`` on
``sys.path`` (the rootdir conftest's directory, prepend import mode).

- ``trees``: source trees (awkward, everyday, special, repository) and ``assert_same_tree``
- ``compare``: the judge (rsync -a copies, per-entry fields, snapshots, diffs)
- ``archives``: crafted and hostile tar archives
- ``cluster``: a fresh embedded cluster and the CLI run in a subprocess
- ``fakes``: a scripted transport that meets on a barrier, never sleeps
- ``procs``: waiting on processes by pidfd
- ``ssh``, ``testbed``, ``backends``: pytest plugins (a loopback sshd, the namespace
  testbed, the ``cluster`` fixture over every backend), registered in tests/conftest.py

Tests import helpers from here, never from conftest or from another test module.
"""
