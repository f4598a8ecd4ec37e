"""The result table's contract: schema, atomic per-trial writes, polars scans."""
