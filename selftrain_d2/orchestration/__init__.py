"""Running the project's commands from other commands: the sweep (``sweep``) and the shared way both the sweep
and the recipe runner start a command and find their files (``commands``)."""
