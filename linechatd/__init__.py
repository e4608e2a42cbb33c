"""linechatd: a distributed WebSocket chat gateway on Trio."""

__version__ = "0.1.0"
