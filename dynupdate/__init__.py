"""dynupdate: dynamic software updates for fleets of video-conferencing endpoints."""

# The one place the version is written: pyproject.toml reads it (setuptools'
# dynamic version), `dynupdate --version` and backups print it.
__version__ = "0.1.0"
