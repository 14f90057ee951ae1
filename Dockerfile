# The project's image: the official Airflow image of the pinned version, plus the project's pinned
# dependencies and its own code. docker-compose.yaml builds it once for every Airflow service, the
# GrowthHub sandbox and the warehouse seeder.
#
# The tag must name the Airflow version pinned in requirements.txt and the Python version
# constraints.txt was resolved on (the Makefile's PYTHON); tests/deploy/test_compose.py checks both.
FROM apache/airflow:3.3.2-python3.11

# The official image wants extra packages installed by the airflow user (into its user site),
# never by root: https://airflow.apache.org/docs/docker-stack/build.html
USER airflow
WORKDIR /opt/airflow

# Dependencies in their own layer, so editing code does not reinstall them. Naming the image's
# apache-airflow next to the requirements makes pip fail the build, instead of silently swapping
# Airflow, if requirements.txt ever pins another version than the tag above.
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/airflow/requirements.txt \
        -c /opt/airflow/constraints.txt

# The project itself, installed editable from /opt/airflow, for two reasons:
# - the packages stay where docker-compose.yaml bind-mounts ./include and ./plugins, so the
#   containers run the code being edited, and there is one copy of each module (a regular install
#   would put a second, stale copy in site-packages next to the plugins folder Airflow puts on
#   sys.path);
# - the image is also complete without the mounts: the copied code is what it runs.
# --no-deps: every dependency was installed, pinned, in the layer above; re-resolving the loose
# ranges of pyproject.toml here could only move a pin.
COPY --chown=airflow:0 pyproject.toml README.md /opt/airflow/
COPY --chown=airflow:0 include/ /opt/airflow/include/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
RUN pip install --no-cache-dir --no-deps -e /opt/airflow

# DAGs and the deployment config are copied too, so the image runs without the compose mounts
# (which overlay these folders with the working tree during development).
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 deploy/ /opt/airflow/deploy/
