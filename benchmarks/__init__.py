"""Benchmarks: linechatd against a python-socketio peer and a plain asyncio gateway."""
