"""Stage functions bound to the workflow's (role, type) nodes, and the step that runs
the plan."""
