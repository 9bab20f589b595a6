-- Partition streams (`ingest-gateway partitions`): a stream sequence is unique within its
-- stream, not across streams, so a dead letter is keyed by its sequence and its subject.
-- A company's records are in one partition stream per layout, and a new layout's
-- sequences start past every older stream's, so (sequence, subject) names one message.
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_stream_seq_key;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_stream_seq_subject_key UNIQUE (stream_seq, subject);
