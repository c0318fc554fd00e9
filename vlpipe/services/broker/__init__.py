"""The session broker: owns the Voice Live WebSockets and routes every event."""
