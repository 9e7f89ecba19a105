"""The namespace testbed: an emulated Chiba City with real SSH, private disks and shaped links."""

from .counters import Measurement, Snapshot, counters, diff_counters, infrastructure_bytes, measure, snapshot
from .faults import FAULTS, fault, heal
from .handle import MPIEXEC, Testbed, mpiexec_argv, open_testbed
from .lifecycle import default_state_dir, down, generated_topology, is_up, status, up
from .plan import TestbedPlan, plan_testbed

__all__ = [
    "Testbed", "open_testbed", "up", "down", "status", "is_up", "default_state_dir",
    "generated_topology", "counters", "snapshot", "measure", "diff_counters",
    "infrastructure_bytes", "Snapshot", "Measurement", "fault", "heal", "FAULTS",
    "mpiexec_argv", "MPIEXEC", "TestbedPlan", "plan_testbed",
]
