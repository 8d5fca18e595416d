-- Run once by the postgres image on an empty data directory: each service owns a
-- database. `app` (POSTGRES_DB) is the web shop's, with its outbox; `billing` is
-- the billing consumer's; `notify` holds the notification service's records.
CREATE DATABASE billing OWNER app;
CREATE DATABASE notify OWNER app;
