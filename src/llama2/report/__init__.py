"""The demo and its report."""
