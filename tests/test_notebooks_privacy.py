def test_privacy_notebook_runs_and_reports_epsilon(execute_notebook):
    _, text = execute_notebook("private_federated_tuning.ipynb")
    assert "flwr run exit code: 0" in text
    assert "Secure aggregation: SecAgg+" in text
    assert "sample-level eps" in text and "saved" in text
