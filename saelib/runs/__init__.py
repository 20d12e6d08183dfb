"""Runs: execute a study notebook headlessly, render it, and index every run on one page."""
