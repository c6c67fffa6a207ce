"""Long-running consumers: liveness monitor, orphan reclaimer, drain handoff, route watchdog."""
