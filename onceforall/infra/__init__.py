"""What the stages run on: object storage, publishing, the energy meter, Prometheus metrics,
and the cost model of N targets."""
