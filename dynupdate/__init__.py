"""dynupdate: dynamic software updates for fleets of video-conferencing endpoints."""

__version__ = "0.1.0"
