"""Model-free evaluation: tasks and prompts (tasks), protocols (protocols), answer extraction and scoring (answers),
records (results), and the loop over them (run).

`qstar eval` under a protocol: load_examples -> select (the protocol's shuffle and limit) -> Task.prompt -> generate
-> Task.answer_prompt -> generate -> the protocol's extractions per sample -> QuestionRecord -> RecordWriter;
summarize + write_results at the end.
"""
