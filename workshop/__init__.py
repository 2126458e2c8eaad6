"""Tooling for whoever runs the notebooks for others: the headless walkthrough (`make run`,
`make notebooks`), reveal.js slides and the offline bundle (`make slides`, `make bundle`).
It imports helpers; notebooks never import it."""
