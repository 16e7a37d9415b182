"""Training methods and schedules as Lightning callbacks (they only schedule and blend)."""

__all__: list[str] = []
