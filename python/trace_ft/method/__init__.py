"""The TRACE method: the warm-start probe (probe), importance and specificity scores and the
core under a budget (select), sketches of earlier updates (sketch), the steps of one task
assembled once (pipeline), and cores carried from a small model to a larger one (transfer)."""
