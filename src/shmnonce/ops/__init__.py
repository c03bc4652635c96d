"""Operator tooling: doctor, repairs that work without attaching, process inspection (psutil)."""
