"""Paper tables: published numbers as CSV data (:mod:`.published`), table declarations
(:mod:`.declare`, ``config/tables/*.yaml``), the renderer (:mod:`.render`) and the audit (:mod:`.audit`)."""
