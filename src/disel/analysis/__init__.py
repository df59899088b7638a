"""Look inside DISeL's gates: record them, summarise them by depth band, module type and rank, score
sequences by how far their gates open (a domain detector), and compact adapters from the statistics."""

from .compact import CompactionPlan, LayerPlan, add_compacted_adapter, cost_report, plan_compaction
from .recorder import GateRecorder, GateSite, parse_gate_name
from .stats import BANDS, SCORES, GateStats, ModuleStats, auroc, band_of

__all__ = [
    "BANDS",
    "SCORES",
    "CompactionPlan",
    "GateRecorder",
    "GateSite",
    "GateStats",
    "LayerPlan",
    "ModuleStats",
    "add_compacted_adapter",
    "auroc",
    "band_of",
    "cost_report",
    "parse_gate_name",
    "plan_compaction",
]
