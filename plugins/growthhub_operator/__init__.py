"""The operator's view in Airflow's UI: the GrowthHub page (sync runs, quarantine, replay).

``plugin`` registers it with Airflow; ``app`` serves it; ``queries`` reads the state tables;
``access`` asks Airflow's auth manager who may read and replay, and triggers the replay DAG.
"""
