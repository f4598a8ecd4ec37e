"""Reports of a sweep's results (``fcsae-report``) and the compact summary table; polars + matplotlib, no Ray."""
