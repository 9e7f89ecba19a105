"""Benchmarks: what is run (workloads), where (sites), named sets of runs (suites), and the
report (records -> aggregate -> render).

    workloads.py  stage, collect, sync, memory, inventory: each returns run dicts
    sites.py      the embedded cluster and the namespace testbed: bring-up, teardown, shapes
    suites.py     named plans (``default``, ``quick``) and the plan behind ``bench stage|...``
    records.py    the one record schema (chiba-bench/2; v1 is read too), environment, CPU
    aggregate.py  pure: records -> rows (medians, ratios, bounds)
    render.py     rich tables, Markdown, PNG figures (matplotlib)
    data.py       generated payloads: random bytes, a text tree, a repository
"""
