"""What a run reports: ``results.json`` and the summary table, the markdown / HTML
report with its plots, live trackers, and the run's place on a speed / accuracy
frontier; before a run, the memory it will need per rank (``capscale plan``)."""
