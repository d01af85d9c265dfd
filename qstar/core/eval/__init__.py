"""Model-free evaluation: tasks and prompts (tasks), answer extraction and scoring (answers), records (results).

`qstar eval` is a loop over these: load_examples -> Task.prompt -> generate -> Task.answer_prompt -> generate ->
Task.extract per sample -> QuestionRecord.scored -> RecordWriter; summarize + write_results at the end.
"""
