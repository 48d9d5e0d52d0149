"""Voice: a stored reply read aloud in its role's voice (DashScope TTS), cached in a local dir or OSS."""
