"""The Kubeflow pipeline (the DAG), its compile-time options and cluster submission."""
