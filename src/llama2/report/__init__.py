"""The demo and its report: `demo` (the driver: the budget, the order of the sections, the report written
after each), `sections/` (one module per report section, with the typed artifacts they pass on), `budget`
(the wall-clock budget and training to a deadline) and `report` (report.md + report.html).

DEFAULT_BUDGET_MINUTES lives here, not in `demo`, so that `llama2 --help` reads it without importing the demo
(which imports torch and every stage)."""

DEFAULT_BUDGET_MINUTES = 15.0
