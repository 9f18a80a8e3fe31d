"""Studies: ablations and the roadmap (plan, run, report)."""
