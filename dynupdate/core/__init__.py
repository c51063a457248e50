"""The domain of dynupdate: store, versions, policies, windows, the update decision.

Nothing here imports typer, rich or any HTTP code.
"""
