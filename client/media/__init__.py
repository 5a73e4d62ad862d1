"""Media for calls: Opus, audio sources and sinks, RTP, encryption, the jitter buffer."""
