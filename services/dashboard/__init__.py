"""The operator dashboard: live alerts, map, incident pages with evidence, feedback, health."""
