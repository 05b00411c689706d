-- Run once by the postgres image on an empty volume: the basic-auth app's user store beside the
-- tracking store (POSTGRES_DB=mlflow).
CREATE DATABASE mlflow_auth;
