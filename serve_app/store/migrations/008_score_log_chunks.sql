-- The chunks the score log has committed, so that a writer which never heard a COMMIT's answer (a lost
-- connection, its write timeout, a shutdown) can tell whether to write the chunk again: score rows have no
-- natural unique key. A chunk's id is inserted in the same transaction as its rows; a retry inserts it again
-- first and writes nothing when it is already there (the insert waits for a transaction still holding it).
-- Writers prune ids older than their retention (ScoreBuffer, score_log.chunk_id_retention_s).
CREATE TABLE score_log_chunks (
    id          uuid PRIMARY KEY,
    rows        integer NOT NULL CHECK (rows >= 0),
    written_at  timestamptz NOT NULL DEFAULT now()
);
-- Query: prune ids past their retention (appended in time order, so a block-range index suffices).
CREATE INDEX score_log_chunks_written_at_idx ON score_log_chunks USING brin (written_at);
